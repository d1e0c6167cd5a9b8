//! Tokens, websocket tickets and the admin token bootstrap.
//!
//! A token is `sbx_` and 32 random bytes in hex. Only its SHA-256 (hex) is stored, in `tokens`
//! (see `migrations/0004_auth.sql`); the secret is shown once, when it is created. A websocket
//! ticket is a short-lived (30 s), single-use secret kept only in memory, for browsers, which
//! cannot set an `Authorization` header on a websocket upgrade. A ticket is bound to the one
//! sandbox it was issued for: it opens only that sandbox's websocket routes.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandboxd_api::Role;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::lifetime::Clock;
use crate::store::{Store, StoreError};
pub use crate::store::{StoredQuota, StoredToken};

/// Prefix of every token secret.
pub const TOKEN_PREFIX: &str = "sbx_";
/// Prefix of every websocket ticket.
pub const TICKET_PREFIX: &str = "sbxt_";
/// How long a websocket ticket stays valid.
pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// The admin token's file name in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// At most this many unused tickets are kept (older ones are dropped first).
const MAX_TICKETS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the system's random number generator failed")]
    Random(#[from] getrandom::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who a request acts as, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `None` for the daemon's own user over the unix socket.
    pub token_id: Option<String>,
    pub tenant: String,
    pub role: Role,
}

fn random_hex() -> Result<String, AuthError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// SHA-256 of a secret, in hex: what the database stores.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Tenant names: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_tenant(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The sandbox a ticket was issued for: its id, and its name if it has one (a websocket URL may
/// name the sandbox either way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketTarget {
    pub id: String,
    pub name: Option<String>,
}

impl TicketTarget {
    fn matches(&self, id_or_name: &str) -> bool {
        self.id == id_or_name || self.name.as_deref() == Some(id_or_name)
    }
}

struct PendingTicket {
    principal: Principal,
    target: TicketTarget,
    expires: Instant,
}

/// Token checks and the in-memory ticket table.
pub struct Auth {
    store: Store,
    clock: Arc<dyn Clock>,
    tickets: Mutex<HashMap<String, PendingTicket>>,
}

impl Auth {
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> Self {
        Auth {
            store,
            clock,
            tickets: Mutex::new(HashMap::new()),
        }
    }

    /// Every token, revoked and expired ones included.
    pub async fn tokens(&self) -> Result<Vec<StoredToken>, AuthError> {
        Ok(self.store.tokens().await?)
    }

    /// Revoke a token now; `false` when there is no such token.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, AuthError> {
        Ok(self
            .store
            .revoke_token(id, self.clock.now_unix_ms())
            .await?)
    }

    pub async fn quota(&self, tenant: &str) -> Result<StoredQuota, AuthError> {
        Ok(self.store.quota(tenant).await?)
    }

    pub async fn set_quota(&self, tenant: &str, quota: &StoredQuota) -> Result<(), AuthError> {
        Ok(self.store.set_quota(tenant, quota).await?)
    }

    /// Create a token; returns the stored row and the secret (shown once).
    pub async fn create_token(
        &self,
        tenant: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<(StoredToken, String), AuthError> {
        let secret = format!("{TOKEN_PREFIX}{}", random_hex()?);
        let now = self.clock.now_unix_ms();
        let token = StoredToken {
            id: Uuid::new_v4().to_string(),
            tenant: tenant.to_owned(),
            role,
            created_at_ms: now,
            expires_at_ms: ttl
                .map(|t| now.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))),
            revoked_at_ms: None,
        };
        self.store
            .insert_token(&token, &hash_secret(&secret))
            .await?;
        Ok((token, secret))
    }

    /// The identity of a bearer token, if it is known, not expired and not revoked.
    pub async fn check_token(&self, secret: &str) -> Result<Option<Principal>, AuthError> {
        if !secret.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let Some(t) = self.store.token_by_hash(&hash_secret(secret)).await? else {
            return Ok(None);
        };
        if !t.is_valid(self.clock.now_unix_ms()) {
            return Ok(None);
        }
        Ok(Some(Principal {
            token_id: Some(t.id),
            tenant: t.tenant,
            role: t.role,
        }))
    }

    fn ticket_table(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingTicket>> {
        // Each operation is a single insert, remove or retain: a poisoned lock is still sound.
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issue a single-use websocket ticket for `principal`, valid only on the websocket routes of
    /// the sandbox `target`; returns it and its lifetime.
    pub fn issue_ticket(
        &self,
        principal: Principal,
        target: TicketTarget,
    ) -> Result<(String, Duration), AuthError> {
        let ticket = format!("{TICKET_PREFIX}{}", random_hex()?);
        let now = Instant::now();
        let mut table = self.ticket_table();
        table.retain(|_, t| t.expires > now);
        if table.len() >= MAX_TICKETS {
            if let Some(oldest) = table
                .iter()
                .min_by_key(|(_, t)| t.expires)
                .map(|(k, _)| k.clone())
            {
                table.remove(&oldest);
            }
        }
        table.insert(
            hash_secret(&ticket),
            PendingTicket {
                principal,
                target,
                expires: now + TICKET_TTL,
            },
        );
        Ok((ticket, TICKET_TTL))
    }

    /// Use up a ticket on a websocket route of the sandbox `sandbox` (an id or a name, as the URL
    /// gives it). A ticket used on another sandbox is refused and used up all the same. Its token
    /// is checked again, so revoking a token also voids its tickets.
    pub async fn redeem_ticket(
        &self,
        ticket: &str,
        sandbox: &str,
    ) -> Result<Option<Principal>, AuthError> {
        let pending = self.ticket_table().remove(&hash_secret(ticket));
        let Some(pending) = pending else {
            return Ok(None);
        };
        if pending.expires <= Instant::now() || !pending.target.matches(sandbox) {
            return Ok(None);
        }
        if let Some(id) = &pending.principal.token_id {
            match self.store.token(id).await? {
                Some(t) if t.is_valid(self.clock.now_unix_ms()) => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(pending.principal))
    }

    /// On start: make sure the daemon's user can reach the API. If `<state-dir>/admin.token`
    /// holds a valid token, keep it. Otherwise, if no valid admin token exists at all, create one
    /// (tenant `default`) and write it there, mode 0600. An admin token that was revoked on
    /// purpose is not brought back while another admin token exists. Returns the path written.
    pub async fn bootstrap_admin(&self, state_dir: &Path) -> Result<Option<PathBuf>, AuthError> {
        let path = state_dir.join(ADMIN_TOKEN_FILE);
        if let Ok(existing) = std::fs::read_to_string(&path) {
            if self.check_token(existing.trim()).await?.is_some() {
                return Ok(None);
            }
        }
        if self
            .store
            .valid_admin_token_exists(self.clock.now_unix_ms())
            .await?
        {
            return Ok(None);
        }
        let (_, secret) = self.create_token("default", Role::Admin, None).await?;
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| AuthError::Io { what, path, source }
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing the stale")(e)),
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(io("creating"))?;
        file.write_all(format!("{secret}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("writing"))?;
        Ok(Some(path))
    }
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// The name of the user this process runs as, for messages.
pub fn current_user_name() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => format!("uid {uid}"),
    }
}

/// Create the admin token if needed and say so on stderr (for `main`).
pub async fn bootstrap_admin_token(auth: &Auth, state_dir: &Path) -> Result<(), AuthError> {
    if let Some(path) = auth.bootstrap_admin(state_dir).await? {
        eprintln!(
            "created an admin token in {} (readable only by {})",
            path.display(),
            current_user_name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn tokens_tickets_and_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let auth = Auth::new(store, crate::lifetime::FakeClock::at(1_000));
        let path = auth.bootstrap_admin(dir.path()).await.unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert!(secret.starts_with(TOKEN_PREFIX) && secret.trim().len() == 4 + 64);
        let who = auth.check_token(secret.trim()).await.unwrap().unwrap();
        assert_eq!((who.tenant.as_str(), who.role), ("default", Role::Admin));
        // A second start keeps it.
        assert!(auth.bootstrap_admin(dir.path()).await.unwrap().is_none());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);
        // Revoked and no other admin: a new one replaces the stale file.
        assert!(auth
            .revoke_token(who.token_id.as_deref().unwrap())
            .await
            .unwrap());
        assert!(auth.check_token(secret.trim()).await.unwrap().is_none());
        assert!(auth.bootstrap_admin(dir.path()).await.unwrap().is_some());
        assert_ne!(std::fs::read_to_string(&path).unwrap(), secret);

        let target = TicketTarget {
            id: "a1".into(),
            name: Some("build".into()),
        };
        let (ticket, _) = auth.issue_ticket(who.clone(), target.clone()).unwrap();
        // The ticket's token was revoked: it is refused (and used up).
        assert!(auth.redeem_ticket(&ticket, "a1").await.unwrap().is_none());
        let (_, fresh) = auth.create_token("t", Role::User, None).await.unwrap();
        let who = auth.check_token(&fresh).await.unwrap().unwrap();
        let (ticket, _) = auth.issue_ticket(who.clone(), target.clone()).unwrap();
        assert_eq!(
            auth.redeem_ticket(&ticket, "build").await.unwrap(),
            Some(who.clone())
        );
        assert!(auth
            .redeem_ticket(&ticket, "build")
            .await
            .unwrap()
            .is_none());
        // On another sandbox: refused, and used up.
        let (ticket, _) = auth.issue_ticket(who, target).unwrap();
        assert!(auth
            .redeem_ticket(&ticket, "other")
            .await
            .unwrap()
            .is_none());
        assert!(auth.redeem_ticket(&ticket, "a1").await.unwrap().is_none());
        assert!(auth.check_token("sbx_nope").await.unwrap().is_none());
    }
}
