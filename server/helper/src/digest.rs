//! The image digest rule of the helper, below both `validate` (which checks a spawn's image) and
//! `image` (which names its store's directories by digest).

/// A digest as the store names it: 64 lower-case hex digits.
pub fn valid_digest(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_64_lower_case_hex_digits_name_an_image() {
        assert!(valid_digest(&"0123456789abcdef".repeat(4)));
        assert!(!valid_digest(&"0123456789ABCDEF".repeat(4)));
        assert!(!valid_digest(&"a".repeat(63)));
        assert!(!valid_digest(&"a".repeat(65)));
        assert!(!valid_digest(&format!("{}/", "a".repeat(63))));
        assert!(!valid_digest(&format!("{}g", "a".repeat(63))));
        assert!(!valid_digest(""));
    }
}
