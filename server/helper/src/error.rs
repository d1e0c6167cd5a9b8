//! The helper's errors as the daemon sees them: every module keeps its own `thiserror` enum, and
//! the request loop (`server.rs`) turns it into the wire's `HelperError` here, with its whole
//! chain of causes in the message.

use sandboxd_protocol::wire::{HelperError, HelperErrorCode};

/// `e` and its causes, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    message
}

/// The wire error of code `code` for `e`.
pub fn wire(code: HelperErrorCode, e: &dyn std::error::Error) -> HelperError {
    HelperError::new(code, error_chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening the store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(error_chain(&e).starts_with("opening the store: No such file or directory"));
        assert_eq!(
            wire(HelperErrorCode::NotFound, &e).code,
            HelperErrorCode::NotFound
        );
    }
}
