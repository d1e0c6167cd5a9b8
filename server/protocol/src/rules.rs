//! Rules both sides check: host names, environment entries, image digests and signals, each
//! parsed by one constructor. The daemon parses client input with them (a 400 names the field);
//! the helper parses what it receives with the same constructors again, since it trusts no caller.

use std::fmt;

use crate::control::ALLOWED_SIGNALS;

/// Longest host name: the kernel's `HOST_NAME_MAX`.
pub const MAX_HOSTNAME: usize = 64;

/// Why a value breaks a rule; the message reads after the field's name (`hostname: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("must be 1-63 letters, digits or '-' per label, not starting or ending with '-', at most {MAX_HOSTNAME} bytes")]
    Hostname,
    #[error("key {0:?} must match [A-Za-z_][A-Za-z0-9_]*")]
    EnvName(String),
    #[error("value of {0} must not contain NUL bytes")]
    EnvValue(String),
    #[error("must be 64 lower-case hex digits (a sha256 digest)")]
    Digest,
    #[error("signal {0:?} is not allowed")]
    Signal(String),
    #[error("must be UID, UID:GID, NAME or NAME:GROUP (ids below {ID_RANGE}, names of 1-32 letters, digits, '_', '.' or '-' not starting with '-')")]
    User,
}

/// Ids inside a sandbox are `0..ID_RANGE` (each sandbox maps a range of this size).
pub const ID_RANGE: u32 = 65536;

/// Longest user or group name.
pub const MAX_ID_NAME: usize = 32;

/// One half of a [`UserSpec`]: a number inside the sandbox's range, or a name to look up in the
/// root filesystem's `/etc/passwd` (or `/etc/group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdRef {
    Id(u32),
    Name(String),
}

impl IdRef {
    fn parse(s: &str) -> Result<Self, RuleError> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u32>() {
                Ok(n) if n < ID_RANGE => Ok(IdRef::Id(n)),
                _ => Err(RuleError::User),
            };
        }
        let ok = (1..=MAX_ID_NAME).contains(&s.len())
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(IdRef::Name(s.to_owned()))
        } else {
            Err(RuleError::User)
        }
    }
}

/// Who a sandbox's command runs as (`user` of a spec, Docker's `--user`): `UID`, `UID:GID`,
/// `NAME` or `NAME:GROUP`, either half a number or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: IdRef,
    pub group: Option<IdRef>,
}

impl UserSpec {
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        Ok(UserSpec {
            user: IdRef::parse(user)?,
            group: group.map(IdRef::parse).transpose()?,
        })
    }
}

/// A host name: dot-separated labels of 1-63 of `[A-Za-z0-9-]`, none starting or ending with
/// `-`, at most [`MAX_HOSTNAME`] bytes in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname(String);

impl Hostname {
    pub fn parse(name: &str) -> Result<Self, RuleError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_HOSTNAME
            && name.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if ok {
            Ok(Hostname(name.to_owned()))
        } else {
            Err(RuleError::Hostname)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of an environment variable: `[A-Za-z_][A-Za-z0-9_]*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvName(String);

impl EnvName {
    pub fn parse(name: &str) -> Result<Self, RuleError> {
        let mut bytes = name.bytes();
        let ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok {
            Ok(EnvName(name.to_owned()))
        } else {
            Err(RuleError::EnvName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One environment entry: a valid name and a value without NUL bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub name: EnvName,
    pub value: String,
}

impl EnvEntry {
    pub fn parse(name: &str, value: &str) -> Result<Self, RuleError> {
        let name = EnvName::parse(name)?;
        if value.contains('\0') {
            return Err(RuleError::EnvValue(name.0));
        }
        Ok(EnvEntry {
            name,
            value: value.to_owned(),
        })
    }

    /// `NAME=value`, as `execve` takes it.
    pub fn to_assignment(&self) -> String {
        format!("{}={}", self.name.0, self.value)
    }
}

/// An image digest: the sha256 of its archive, 64 lower-case hex digits (also its directory name
/// in the helper's image store, so nothing else may pass).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn parse(digest: &str) -> Result<Self, RuleError> {
        let ok = digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Digest(digest.to_owned()))
        } else {
            Err(RuleError::Digest)
        }
    }

    /// The digest of `hash` (32 bytes of a sha256).
    pub fn of_sha256(hash: &[u8; 32]) -> Self {
        use fmt::Write;
        let mut hex = String::with_capacity(64);
        for b in hash {
            let _ = write!(hex, "{b:02x}");
        }
        Digest(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Linux's standard signals by number (index 0 is unused).
const SIGNAL_NAMES: [&str; 32] = [
    "",
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// A signal a client may ask a monitor to deliver (one of [`ALLOWED_SIGNALS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(i32);

impl Signal {
    pub const KILL: Signal = Signal(9);

    /// `SIGTERM`, `TERM`, `term` or `15`.
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        let refused = || RuleError::Signal(s.to_owned());
        let n = match s.parse::<i32>() {
            Ok(n) => n,
            Err(_) => {
                let upper = s.to_ascii_uppercase();
                let name = if upper.starts_with("SIG") {
                    upper
                } else {
                    format!("SIG{upper}")
                };
                SIGNAL_NAMES
                    .iter()
                    .skip(1)
                    .position(|n| *n == name)
                    .ok_or_else(refused)? as i32
                    + 1
            }
        };
        if ALLOWED_SIGNALS.contains(&n) {
            Ok(Signal(n))
        } else {
            Err(refused())
        }
    }

    pub fn number(self) -> i32 {
        self.0
    }

    /// The name of any signal number: `SIGKILL` for 9, `SIG40` for one without a name.
    pub fn name_of(n: i32) -> String {
        usize::try_from(n)
            .ok()
            .filter(|&i| (1..SIGNAL_NAMES.len()).contains(&i))
            .map(|i| SIGNAL_NAMES[i].to_owned())
            .unwrap_or_else(|| format!("SIG{n}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for ok in ["a", "box-1", "a.b-c", "x".repeat(63).as_str()] {
            assert_eq!(Hostname::parse(ok).unwrap().as_str(), ok);
        }
        let long = format!("{}.{}", "a".repeat(32), "b".repeat(32));
        for bad in ["", "-x", "x-", "a b", "a..b", "a_b", long.as_str()] {
            assert_eq!(Hostname::parse(bad), Err(RuleError::Hostname), "{bad:?}");
        }
        assert!(Hostname::parse(&long[..64]).is_ok());
    }

    #[test]
    fn env_entries() {
        assert!(EnvEntry::parse("A_1", "x").is_ok());
        assert!(EnvEntry::parse("_", "").is_ok());
        assert_eq!(
            EnvEntry::parse("1A", "x"),
            Err(RuleError::EnvName("1A".into()))
        );
        assert_eq!(
            EnvEntry::parse("A=B", "x"),
            Err(RuleError::EnvName("A=B".into()))
        );
        assert_eq!(EnvName::parse(""), Err(RuleError::EnvName("".into())));
        assert_eq!(
            EnvEntry::parse("A", "a\0b"),
            Err(RuleError::EnvValue("A".into()))
        );
        assert_eq!(EnvEntry::parse("A", "b").unwrap().to_assignment(), "A=b");
    }

    #[test]
    fn users() {
        let id = |n| Some(IdRef::Id(n));
        let name = |s: &str| Some(IdRef::Name(s.into()));
        let check = |s: &str, user: Option<IdRef>, group: Option<Option<IdRef>>| {
            let want = match (user, group) {
                (Some(user), Some(group)) => Ok(UserSpec { user, group }),
                _ => Err(RuleError::User),
            };
            assert_eq!(UserSpec::parse(s), want, "{s:?}");
        };
        check("0", id(0), Some(None));
        check("1000:1000", id(1000), Some(id(1000)));
        check("65535", id(65535), Some(None));
        check("app", name("app"), Some(None));
        check("app:staff", name("app"), Some(name("staff")));
        check("www-data:33", name("www-data"), Some(id(33)));
        check("1000:_g.1", id(1000), Some(name("_g.1")));
        for bad in [
            "",
            ":",
            "1000:",
            ":1000",
            "65536",
            "99999999999",
            "-x",
            "a b",
            "a:b:c",
            "a/b",
            &"x".repeat(33),
        ] {
            check(bad, None, None);
        }
    }

    #[test]
    fn digests() {
        let d = "ab".repeat(32);
        assert_eq!(Digest::parse(&d).unwrap().as_str(), d);
        for bad in [
            "",
            "../../etc",
            &"AB".repeat(32),
            &"ab".repeat(31),
            &"g".repeat(64),
        ] {
            assert_eq!(Digest::parse(bad), Err(RuleError::Digest), "{bad:?}");
        }
        let mut hash = [0u8; 32];
        hash[0] = 0xab;
        hash[31] = 0x01;
        let d = Digest::of_sha256(&hash);
        assert_eq!(d.as_str().len(), 64);
        assert!(d.as_str().starts_with("ab00") && d.as_str().ends_with("01"));
        assert_eq!(Digest::parse(d.as_str()), Ok(d));
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(Signal::parse("SIGTERM").map(Signal::number), Ok(15));
        assert_eq!(Signal::parse("term").map(Signal::number), Ok(15));
        assert_eq!(Signal::parse("WINCH").map(Signal::number), Ok(28));
        assert_eq!(Signal::parse("9"), Ok(Signal::KILL));
        for bad in ["SIGSEGV", "SIGSTOP", "0", "-9", "bogus", "SIG", ""] {
            assert_eq!(
                Signal::parse(bad),
                Err(RuleError::Signal(bad.into())),
                "{bad:?}"
            );
        }
        // Every allowed signal has a name that parses back to it.
        for &n in ALLOWED_SIGNALS {
            assert_eq!(Signal::parse(&Signal::name_of(n)), Ok(Signal(n)));
        }
        assert_eq!(Signal::name_of(9), "SIGKILL");
        assert_eq!(Signal::name_of(31), "SIGSYS");
        assert_eq!(Signal::name_of(40), "SIG40");
        assert_eq!(Signal::name_of(0), "SIG0");
        assert_eq!(Signal::name_of(-1), "SIG-1");
    }
}
