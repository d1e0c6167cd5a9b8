//! The policy table: every sandbox's policy keyed by its address in the hub, the names the
//! filter resolved for it, its counters and its open connections; and the one decision function
//! both a new connection and a policy change go through.
//!
//! Decisions for a TCP connection, in order (design decision 1 and 2):
//! 1. the destination is in an always-denied range, a `denied` range of the configuration, or
//!    the sandboxes' own subnet: `private_range`;
//! 2. a `deny` name rule covers the presented name: `not_allowed` (deny wins);
//! 3. a name rule allows the name: an address `deny` rule still denies (`not_allowed`); the
//!    destination must be an address the filter resolved for that name for this sandbox, unless
//!    an address rule allows it anyway (a client could have sent no name at all), else
//!    `name_mismatch`;
//! 4. otherwise (no name, or a name no name rule allows) the address rules decide:
//!    `not_allowed` unless one allows it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandboxd_api::egress::{
    always_denied, DenialReason, EgressCounters, EgressPolicy, Ipv4Net, Verdict,
};
use sandboxd_protocol::egress::{FilterConfig, SandboxPolicy};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most names remembered per sandbox; past it expired names go first, then the oldest.
pub const MAX_NAMES: usize = 4096;
/// How long after its TTL a resolved address still counts, for clients that connect just as
/// the record expires (or cache a little longer than told).
pub const RESOLVED_GRACE: Duration = Duration::from_secs(60);
/// A DNS denial of the same name by the same sandbox within this window is not recorded again.
pub const DNS_DENIAL_WINDOW: Duration = Duration::from_secs(5);
/// Most connections one sandbox may have open (or being decided) at once; past it a new one is
/// reset and recorded as `not_allowed`.
pub const MAX_CONNECTIONS_PER_SANDBOX: usize = 256;

/// Destinations no policy opens: fixed for the life of the process.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub subnet: Option<Ipv4Net>,
    pub lifted: Vec<Ipv4Net>,
    pub denied: Vec<Ipv4Net>,
}

impl Limits {
    pub fn from_config(config: &FilterConfig) -> Limits {
        Limits {
            subnet: Some(config.subnet),
            lifted: config.lifted.clone(),
            denied: config.denied.clone(),
        }
    }

    /// Is `addr` never reachable (`private_range`)?
    pub fn is_private(&self, addr: Ipv4Addr) -> bool {
        always_denied(addr, &self.lifted).is_some()
            || self.denied.iter().any(|n| n.contains(addr))
            || self.subnet.is_some_and(|n| n.contains(addr))
    }
}

/// On what an allowed connection was allowed: re-checked when the policy changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// A name rule, and the destination was resolved for that name.
    Name,
    /// An address rule (or `*`).
    Address,
}

/// The decision on a connection to `dest:port` presenting `name`, by the policy alone (the
/// caller has checked [`Limits::is_private`]). `name_resolved`: the filter resolved `name` to
/// `dest` for this sandbox.
pub fn decide(
    policy: &EgressPolicy,
    dest: Ipv4Addr,
    port: u16,
    name: Option<&str>,
    name_resolved: bool,
) -> Result<Basis, DenialReason> {
    let address_allows = policy.check_address(dest, port) == Verdict::Allow;
    if let Some(name) = name {
        if policy.deny.iter().any(|r| r.matches_name(name, port)) {
            return Err(DenialReason::NotAllowed);
        }
        if policy.check_name(name, port) == Verdict::Allow {
            if policy.denies_address(dest, port) {
                return Err(DenialReason::NotAllowed);
            }
            if name_resolved {
                return Ok(Basis::Name);
            }
            if address_allows {
                return Ok(Basis::Address);
            }
            return Err(DenialReason::NameMismatch);
        }
    }
    if address_allows {
        Ok(Basis::Address)
    } else {
        Err(DenialReason::NotAllowed)
    }
}

/// Could the server name change the decision on `dest:port`? If not, the filter decides at once
/// without waiting for the client's first bytes (which a protocol where the server speaks first
/// would never send).
pub fn name_matters(policy: &EgressPolicy, dest: Ipv4Addr, port: u16) -> bool {
    let has_name_rules = policy.allow.iter().any(|r| r.is_name_rule());
    let denies_names = policy.deny.iter().any(|r| r.is_name_rule());
    if !has_name_rules && !denies_names {
        return false;
    }
    let address_allows = policy.check_address(dest, port) == Verdict::Allow;
    !address_allows || denies_names
}

/// A sandbox's totals, shared with its connection tasks (which add bytes as they copy).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections_allowed: AtomicU64,
    pub connections_denied: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Changed since last reported.
    pub dirty: AtomicBool,
    /// Connections open or being decided.
    active: AtomicUsize,
}

impl Stats {
    pub fn snapshot(&self) -> EgressCounters {
        EgressCounters {
            connections_allowed: self.connections_allowed.load(Ordering::Relaxed),
            connections_denied: self.connections_denied.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
        }
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Count one more active connection, or `None` past [`MAX_CONNECTIONS_PER_SANDBOX`].
    pub fn enter(self: &Arc<Self>) -> Option<ActiveGuard> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveGuard(Arc::clone(self));
        (before < MAX_CONNECTIONS_PER_SANDBOX).then_some(guard)
    }
}

/// One active connection of a sandbox; dropping it ends it.
pub struct ActiveGuard(Arc<Stats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open, allowed connection: what it was decided on, and how to cut it.
#[derive(Debug)]
pub struct Conn {
    pub name: Option<String>,
    pub dest: Ipv4Addr,
    pub port: u16,
    pub basis: Basis,
    pub cut: CancellationToken,
}

/// A connection a policy change cut, for its denial event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub sandbox: Uuid,
    pub name: Option<String>,
    pub dest: Ipv4Addr,
    pub port: u16,
    pub reason: DenialReason,
}

/// One sandbox's entry.
#[derive(Debug)]
pub struct Entry {
    pub id: Uuid,
    pub policy: Arc<EgressPolicy>,
    pub stats: Arc<Stats>,
    /// Name → address → until when it counts as resolved for that name.
    resolved: HashMap<String, HashMap<Ipv4Addr, Instant>>,
    /// Names whose DNS denial was last recorded when.
    dns_denials: HashMap<String, Instant>,
    conns: HashMap<u64, Conn>,
}

impl Entry {
    fn new(id: Uuid, policy: EgressPolicy, stats: Arc<Stats>) -> Entry {
        Entry {
            id,
            policy: Arc::new(policy),
            stats,
            resolved: HashMap::new(),
            dns_denials: HashMap::new(),
            conns: HashMap::new(),
        }
    }

    /// Did the filter resolve `name` to `addr` for this sandbox, recently enough?
    pub fn resolved(&self, name: &str, addr: Ipv4Addr, now: Instant) -> bool {
        self.resolved
            .get(name)
            .and_then(|addrs| addrs.get(&addr))
            .is_some_and(|until| *until > now)
    }

    /// Did the filter resolve any name to `addr` for this sandbox, recently enough? If not, and
    /// no address rule allows `addr`, no server name can make a connection there allowed.
    pub fn resolved_any(&self, addr: Ipv4Addr, now: Instant) -> bool {
        self.resolved
            .values()
            .any(|addrs| addrs.get(&addr).is_some_and(|until| *until > now))
    }

    /// Would a connection to `dest:port` presenting `name` be allowed if `name` resolved to
    /// `dest`, and has it not (recently, through the filter)? Then the filter asks the upstream
    /// itself before deciding: a client may have cached an answer longer than told, or from
    /// before the filter restarted.
    pub fn needs_resolving(&self, name: &str, dest: Ipv4Addr, port: u16, now: Instant) -> bool {
        !self.resolved(name, dest, now)
            && decide(&self.policy, dest, port, Some(name), false)
                == Err(DenialReason::NameMismatch)
    }

    /// Should a DNS denial of `name` be recorded now (none within [`DNS_DENIAL_WINDOW`])?
    pub fn first_dns_denial(&mut self, name: &str, now: Instant) -> bool {
        if self
            .dns_denials
            .get(name)
            .is_some_and(|t| now < *t + DNS_DENIAL_WINDOW)
        {
            return false;
        }
        if self.dns_denials.len() >= MAX_NAMES {
            self.dns_denials.retain(|_, t| now < *t + DNS_DENIAL_WINDOW);
        }
        self.dns_denials.insert(name.to_owned(), now);
        true
    }

    /// Remember that `name` resolved to `addrs` for `ttl`.
    pub fn remember(&mut self, name: &str, addrs: &[Ipv4Addr], ttl: Duration, now: Instant) {
        if addrs.is_empty() {
            return;
        }
        if !self.resolved.contains_key(name) && self.resolved.len() >= MAX_NAMES {
            self.resolved.retain(|_, a| {
                a.retain(|_, until| *until > now);
                !a.is_empty()
            });
            if self.resolved.len() >= MAX_NAMES {
                let oldest = self
                    .resolved
                    .iter()
                    .min_by_key(|(_, a)| a.values().max().copied())
                    .map(|(n, _)| n.clone());
                if let Some(oldest) = oldest {
                    self.resolved.remove(&oldest);
                }
            }
        }
        let until = now + ttl + RESOLVED_GRACE;
        let known = self.resolved.entry(name.to_owned()).or_default();
        for addr in addrs {
            let e = known.entry(*addr).or_insert(until);
            *e = (*e).max(until);
        }
    }

    /// Cancel (and forget) every connection the current policy no longer allows.
    fn cut_disallowed(&mut self) -> Vec<Cut> {
        let policy = Arc::clone(&self.policy);
        let now = Instant::now();
        let resolved = &self.resolved;
        let mut cuts = Vec::new();
        self.conns.retain(|_, c| {
            // Allowed by its name once, it stays resolved for its whole life; allowed by an
            // address rule, its name may have resolved to its destination meanwhile.
            let name_resolved = c.basis == Basis::Name
                || c.name.as_deref().is_some_and(|n| {
                    resolved
                        .get(n)
                        .and_then(|a| a.get(&c.dest))
                        .is_some_and(|until| *until > now)
                });
            let verdict = decide(&policy, c.dest, c.port, c.name.as_deref(), name_resolved);
            match verdict {
                Ok(_) => true,
                Err(reason) => {
                    c.cut.cancel();
                    cuts.push(Cut {
                        sandbox: self.id,
                        name: c.name.clone(),
                        dest: c.dest,
                        port: c.port,
                        reason,
                    });
                    false
                }
            }
        });
        cuts
    }

    fn cut_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.cut.cancel();
        }
    }
}

/// What a connection attempt was decided as, with what to report.
#[derive(Debug)]
pub enum Decision {
    Allowed {
        conn_id: u64,
        cut: CancellationToken,
    },
    Denied(DenialReason),
}

/// Every sandbox's entry, by address.
#[derive(Debug, Default)]
pub struct Table {
    by_addr: HashMap<Ipv4Addr, Entry>,
    next_conn: u64,
}

impl Table {
    pub fn get(&self, addr: Ipv4Addr) -> Option<&Entry> {
        self.by_addr.get(&addr)
    }

    pub fn get_mut(&mut self, addr: Ipv4Addr) -> Option<&mut Entry> {
        self.by_addr.get_mut(&addr)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.by_addr.values()
    }

    /// Set or replace one sandbox's policy; returns the connections it cut.
    pub fn set(&mut self, sp: SandboxPolicy) -> Vec<Cut> {
        let SandboxPolicy {
            sandbox,
            address,
            policy,
        } = sp;
        // The same sandbox at another address (it should not happen: addresses are fixed for a
        // sandbox's life) loses its old entry but keeps its totals.
        let moved = self
            .by_addr
            .iter()
            .find(|(a, e)| e.id == sandbox && **a != address)
            .map(|(a, _)| *a);
        let mut stats = None;
        if let Some(old) = moved {
            if let Some(mut e) = self.by_addr.remove(&old) {
                e.cut_all();
                stats = Some(e.stats);
            }
        }
        match self.by_addr.get_mut(&address) {
            Some(e) if e.id == sandbox => {
                e.policy = Arc::new(policy);
                e.cut_disallowed()
            }
            _ => {
                // A different sandbox held this address: it is gone.
                if let Some(mut old) = self.by_addr.remove(&address) {
                    old.cut_all();
                }
                let stats = stats.unwrap_or_default();
                self.by_addr
                    .insert(address, Entry::new(sandbox, policy, stats));
                Vec::new()
            }
        }
    }

    /// Drop a sandbox's policy and close its connections. Its totals, if it was known.
    pub fn remove(&mut self, sandbox: Uuid) -> Option<Arc<Stats>> {
        let addr = self
            .by_addr
            .iter()
            .find(|(_, e)| e.id == sandbox)
            .map(|(a, _)| *a);
        let mut e = addr.and_then(|a| self.by_addr.remove(&a))?;
        e.cut_all();
        Some(e.stats)
    }

    /// Replace the whole set: sandboxes not listed are removed, the others set.
    pub fn sync(&mut self, sandboxes: Vec<SandboxPolicy>) -> Vec<Cut> {
        let keep: std::collections::HashSet<Uuid> = sandboxes.iter().map(|s| s.sandbox).collect();
        let gone: Vec<Uuid> = self
            .by_addr
            .values()
            .filter(|e| !keep.contains(&e.id))
            .map(|e| e.id)
            .collect();
        for id in gone {
            self.remove(id);
        }
        sandboxes.into_iter().flat_map(|s| self.set(s)).collect()
    }

    /// Decide a connection of sandbox `id` (still at `src`) to `dest:port` presenting `name`,
    /// count it, and register it if allowed. The caller has checked private ranges.
    pub fn decide_connection(
        &mut self,
        src: Ipv4Addr,
        id: Uuid,
        dest: Ipv4Addr,
        port: u16,
        name: Option<String>,
        now: Instant,
    ) -> Decision {
        let Some(entry) = self.by_addr.get_mut(&src).filter(|e| e.id == id) else {
            // The sandbox's policy went away while its first bytes were read.
            return Decision::Denied(DenialReason::NotAllowed);
        };
        let resolved = name
            .as_deref()
            .is_some_and(|n| entry.resolved(n, dest, now));
        match decide(&entry.policy, dest, port, name.as_deref(), resolved) {
            Ok(basis) => {
                let conn_id = self.next_conn;
                self.next_conn += 1;
                let cut = CancellationToken::new();
                entry.conns.insert(
                    conn_id,
                    Conn {
                        name,
                        dest,
                        port,
                        basis,
                        cut: cut.clone(),
                    },
                );
                entry.stats.add(&entry.stats.connections_allowed, 1);
                Decision::Allowed { conn_id, cut }
            }
            Err(reason) => {
                entry.stats.add(&entry.stats.connections_denied, 1);
                Decision::Denied(reason)
            }
        }
    }

    /// A connection ended (or was cut): forget it.
    pub fn finish(&mut self, src: Ipv4Addr, conn_id: u64) {
        if let Some(e) = self.by_addr.get_mut(&src) {
            e.conns.remove(&conn_id);
        }
    }

    /// Open connections of the sandbox at `src`.
    #[cfg(test)]
    pub fn open_connections(&self, src: Ipv4Addr) -> usize {
        self.by_addr.get(&src).map_or(0, |e| e.conns.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy {
            allow: allow.iter().map(|s| s.parse().expect("a rule")).collect(),
            deny: deny.iter().map(|s| s.parse().expect("a rule")).collect(),
        }
    }

    const A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

    #[test]
    fn decisions() {
        use DenialReason::*;
        let check = |p: &EgressPolicy, dest, port, name, resolved, want| {
            assert_eq!(
                decide(p, dest, port, name, resolved),
                want,
                "{p:?} {dest}:{port} {name:?} resolved={resolved}"
            );
        };
        let names = policy(&["pypi.org:443", "*.npmjs.org"], &[]);
        check(&names, A, 443, Some("pypi.org"), true, Ok(Basis::Name));
        check(&names, A, 80, Some("pypi.org"), true, Err(NotAllowed));
        check(&names, A, 443, Some("pypi.org"), false, Err(NameMismatch));
        check(
            &names,
            A,
            80,
            Some("registry.npmjs.org"),
            true,
            Ok(Basis::Name),
        );
        check(&names, A, 443, Some("evil.org"), true, Err(NotAllowed));
        check(&names, A, 443, None, false, Err(NotAllowed));

        // Address rules cover everything else, names included.
        let mixed = policy(&["pypi.org", "203.0.113.20"], &[]);
        check(&mixed, B, 443, None, false, Ok(Basis::Address));
        check(&mixed, B, 443, Some("evil.org"), false, Ok(Basis::Address));
        check(&mixed, B, 443, Some("pypi.org"), false, Ok(Basis::Address));
        check(&mixed, A, 443, Some("pypi.org"), false, Err(NameMismatch));

        // Deny wins: by name, and by address for a named connection.
        let deny = policy(&["*"], &["*.bad.org", "203.0.113.20:25"]);
        check(&deny, A, 443, Some("x.bad.org"), true, Err(NotAllowed));
        check(&deny, B, 25, Some("good.org"), true, Err(NotAllowed));
        check(&deny, B, 25, None, false, Err(NotAllowed));
        check(&deny, B, 443, Some("good.org"), false, Ok(Basis::Address));
        let deny_name = policy(&["203.0.113.0/24"], &["evil.org"]);
        check(&deny_name, A, 443, Some("evil.org"), false, Err(NotAllowed));
        check(
            &deny_name,
            A,
            443,
            Some("fine.org"),
            false,
            Ok(Basis::Address),
        );

        let none = EgressPolicy::default();
        check(&none, A, 443, Some("pypi.org"), true, Err(NotAllowed));
        check(&none, A, 443, None, false, Err(NotAllowed));
    }

    #[test]
    fn the_name_matters_only_where_it_can_change_the_outcome() {
        assert!(!name_matters(&policy(&["203.0.113.0/24"], &[]), A, 22));
        assert!(!name_matters(&policy(&[], &[]), A, 22));
        assert!(!name_matters(&policy(&["*"], &[]), A, 22));
        assert!(name_matters(&policy(&["pypi.org"], &[]), A, 443));
        assert!(name_matters(
            &policy(&["203.0.113.0/24"], &["evil.org"]),
            A,
            443
        ));
        assert!(name_matters(
            &policy(&["pypi.org", "203.0.113.20"], &[]),
            A,
            443
        ));
        assert!(!name_matters(
            &policy(&["pypi.org", "203.0.113.20"], &[]),
            B,
            443
        ));
    }

    #[test]
    fn private_ranges_subnet_and_denied() {
        let limits = Limits {
            subnet: Some("198.51.100.0/28".parse().expect("net")),
            lifted: vec!["10.1.0.0/16".parse().expect("net")],
            denied: vec!["203.0.113.99".parse().expect("net")],
        };
        assert!(limits.is_private(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(limits.is_private(Ipv4Addr::new(169, 254, 169, 254)));
        assert!(limits.is_private(Ipv4Addr::new(198, 51, 100, 1)));
        assert!(limits.is_private(Ipv4Addr::new(203, 0, 113, 99)));
        assert!(!limits.is_private(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!limits.is_private(Ipv4Addr::new(198, 51, 100, 53)));
        assert!(!limits.is_private(A));
    }

    fn sp(id: Uuid, addr: Ipv4Addr, p: EgressPolicy) -> SandboxPolicy {
        SandboxPolicy {
            sandbox: id,
            address: addr,
            policy: p,
        }
    }

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn allowed(d: Decision) -> (u64, CancellationToken) {
        match d {
            Decision::Allowed { conn_id, cut } => (conn_id, cut),
            Decision::Denied(r) => panic!("denied: {r:?}"),
        }
    }

    #[test]
    fn a_policy_change_cuts_exactly_what_it_no_longer_allows() {
        let id = Uuid::new_v4();
        let now = Instant::now();
        let mut t = Table::default();
        t.set(sp(id, SRC, policy(&["pypi.org", "203.0.113.20:22"], &[])));
        t.get_mut(SRC)
            .expect("entry")
            .remember("pypi.org", &[A], Duration::from_secs(30), now);
        let (_, by_name) =
            allowed(t.decide_connection(SRC, id, A, 443, Some("pypi.org".into()), now));
        let (_, by_addr) = allowed(t.decide_connection(SRC, id, B, 22, None, now));
        assert_eq!(t.open_connections(SRC), 2);

        // Same rules in another order: nothing is cut.
        assert!(t
            .set(sp(id, SRC, policy(&["203.0.113.20:22", "pypi.org"], &[])))
            .is_empty());
        assert!(!by_name.is_cancelled() && !by_addr.is_cancelled());

        // The name rule goes: its connection is cut, the address one stays.
        let cuts = t.set(sp(id, SRC, policy(&["203.0.113.20:22"], &[])));
        assert_eq!(
            cuts,
            vec![Cut {
                sandbox: id,
                name: Some("pypi.org".into()),
                dest: A,
                port: 443,
                reason: DenialReason::NotAllowed,
            }]
        );
        assert!(by_name.is_cancelled() && !by_addr.is_cancelled());
        assert_eq!(t.open_connections(SRC), 1);

        // Allowed by an address rule with a name that resolved there: a policy that keeps only
        // the name rule keeps it.
        t.set(sp(
            id,
            SRC,
            policy(&["203.0.113.20:22", "203.0.113.10"], &[]),
        ));
        let (_, by_addr_named) =
            allowed(t.decide_connection(SRC, id, A, 8080, Some("pypi.org".into()), now));
        assert!(t
            .set(sp(id, SRC, policy(&["203.0.113.20:22", "pypi.org"], &[])))
            .is_empty());
        assert!(!by_addr_named.is_cancelled());

        // A deny rule for the address cuts the other one.
        let cuts = t.set(sp(id, SRC, policy(&["*"], &["203.0.113.20"])));
        assert_eq!(cuts.len(), 1);
        assert!(by_addr.is_cancelled() && !by_addr_named.is_cancelled());
        let stats = t.get(SRC).expect("entry").stats.snapshot();
        assert_eq!(stats.connections_allowed, 3);
        assert_eq!(stats.connections_denied, 0);
    }

    #[test]
    fn remove_and_sync_cut_everything_of_a_gone_sandbox() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let src_b = Ipv4Addr::new(198, 51, 100, 3);
        let now = Instant::now();
        let mut t = Table::default();
        t.set(sp(a, SRC, policy(&["*"], &[])));
        t.set(sp(b, src_b, policy(&["*"], &[])));
        let (_, ca) = allowed(t.decide_connection(SRC, a, A, 80, None, now));
        let (_, cb) = allowed(t.decide_connection(src_b, b, A, 80, None, now));
        t.sync(vec![sp(b, src_b, policy(&["*"], &[]))]);
        assert!(ca.is_cancelled() && !cb.is_cancelled());
        assert!(t.get(SRC).is_none());
        assert!(t.remove(b).is_some());
        assert!(cb.is_cancelled());
        assert!(t.remove(b).is_none());
        // A connection decided for a sandbox that is gone is denied.
        assert!(matches!(
            t.decide_connection(SRC, a, A, 80, None, now),
            Decision::Denied(DenialReason::NotAllowed)
        ));
    }

    #[test]
    fn resolved_names_expire_and_are_bounded() {
        let id = Uuid::new_v4();
        let now = Instant::now();
        let mut t = Table::default();
        t.set(sp(id, SRC, policy(&["pypi.org"], &[])));
        let e = t.get_mut(SRC).expect("entry");
        e.remember("pypi.org", &[A], Duration::from_secs(10), now);
        assert!(e.resolved("pypi.org", A, now));
        assert!(e.resolved_any(A, now) && !e.resolved_any(B, now));
        assert!(!e.needs_resolving("pypi.org", A, 443, now));
        assert!(e.needs_resolving("pypi.org", B, 443, now));
        assert!(!e.needs_resolving("other.org", B, 443, now));
        assert!(e.first_dns_denial("x.org", now));
        assert!(!e.first_dns_denial("x.org", now + Duration::from_secs(1)));
        assert!(e.first_dns_denial("x.org", now + DNS_DENIAL_WINDOW));
        assert!(!e.resolved("pypi.org", B, now));
        assert!(!e.resolved("other.org", A, now));
        let later = now + Duration::from_secs(10) + RESOLVED_GRACE;
        assert!(!e.resolved("pypi.org", A, later));
        for i in 0..MAX_NAMES + 10 {
            e.remember(&format!("n{i}.org"), &[A], Duration::from_secs(10), now);
        }
        assert!(e.resolved.len() <= MAX_NAMES);
        // A forged name toward an address it did not resolve to is a mismatch.
        assert!(matches!(
            t.decide_connection(SRC, id, B, 443, Some("pypi.org".into()), now),
            Decision::Denied(DenialReason::NameMismatch)
        ));
        assert_eq!(
            t.get(SRC)
                .expect("entry")
                .stats
                .snapshot()
                .connections_denied,
            1
        );
    }

    #[test]
    fn the_connection_limit() {
        let stats = Arc::new(Stats::default());
        let guards: Vec<_> = (0..MAX_CONNECTIONS_PER_SANDBOX)
            .map(|_| stats.enter().expect("under the limit"))
            .collect();
        assert!(stats.enter().is_none());
        drop(guards);
        assert!(stats.enter().is_some());
    }
}
