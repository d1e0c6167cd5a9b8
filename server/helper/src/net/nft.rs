//! nftables over netlink, written by hand: the few messages and expressions the hub and the
//! uplink need, in whichever network namespace the socket was opened in.
//!
//! There is no `nft` binary to shell out to, and the Rust bindings that exist are GPL-3.0 (this
//! project is Apache-2.0) and need libclang at build time; the wire format is small and stable
//! (`linux/netfilter/nf_tables.h`). A [`Ruleset`] is one table (family `ip`), written whole in
//! one atomic batch by [`Nft::replace`]: create the table (a no-op if it exists), delete it
//! (with every chain and rule a previous helper left in it), create it again with its chains
//! and rules. So a restarted helper never merges with what it finds, and [`Nft::delete_table`]
//! is idempotent by the same create-then-delete trick.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening a netfilter netlink socket")]
    Socket(#[source] nix::errno::Errno),
    #[error("sending to netfilter")]
    Send(#[source] nix::errno::Errno),
    #[error("receiving from netfilter")]
    Receive(#[source] nix::errno::Errno),
    #[error("netfilter refused {step}")]
    Refused {
        step: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("a malformed netfilter answer")]
    Malformed,
}

// linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
const NLMSG_ERROR: u16 = 2;
#[cfg(test)]
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
#[cfg(test)]
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
#[cfg(test)]
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
/// `NFPROTO_IPV4`: every table here is of the `ip` family (sandboxes have IPv4 only).
const FAMILY_IP: u8 = 2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// The first 16-byte data register.
const REG_1: u32 = 1;
const REG_VERDICT: u32 = 0;

/// Netfilter hooks of the `ip` family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// A base chain's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

/// A chain: a base chain (hooked, with a policy) or a regular one (reached by a jump).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// Hook, priority, type and whether the policy accepts.
    pub base: Option<(Hook, i32, ChainType, bool)>,
}

/// What a rule ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
}

/// One expression of a rule. Matches load into register 1 and compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta KEY` into register 1.
    Meta(MetaKey),
    /// Compare register 1 with `data`: equal or not.
    Cmp { equal: bool, data: Vec<u8> },
    /// `LEN` bytes of the network (`true`) or transport header at `offset` into register 1.
    Payload {
        network: bool,
        offset: u32,
        len: u32,
    },
    /// Register 1 = (register 1 & mask) ^ 0, over `mask.len()` bytes.
    Mask(Vec<u8>),
    /// `ct state` into register 1.
    CtState,
    /// The rule's verdict.
    Verdict(Verdict),
    /// `redirect to :PORT` (to the primary address of the incoming interface).
    Redirect(u16),
    /// `reject`: a TCP reset (`true`) or an ICMP port unreachable.
    Reject { tcp_reset: bool },
    /// `masquerade`.
    Masquerade,
}

/// Keys of `meta` this module loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    IifName = 6,
    OifName = 7,
    SkUid = 10,
    L4Proto = 16,
}

/// `ct state` bits (host byte order).
pub const CT_ESTABLISHED: u32 = 1 << 1;
pub const CT_RELATED: u32 = 1 << 2;

/// Match helpers: each is the expressions of one condition.
pub mod matches {
    use std::net::Ipv4Addr;

    use super::{Expr, MetaKey};
    use sandboxd_api::egress::Ipv4Net;

    /// The incoming interface's name starts with `prefix` (nft's `iifname "prefix*"`).
    pub fn iifname_prefix(prefix: &str) -> Vec<Expr> {
        vec![
            Expr::Meta(MetaKey::IifName),
            Expr::Cmp {
                equal: true,
                data: prefix.as_bytes().to_vec(),
            },
        ]
    }

    fn name_data(name: &str) -> Vec<u8> {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        data
    }

    /// The incoming interface is `name`.
    pub fn iifname(name: &str) -> Vec<Expr> {
        vec![
            Expr::Meta(MetaKey::IifName),
            Expr::Cmp {
                equal: true,
                data: name_data(name),
            },
        ]
    }

    /// The outgoing interface is (`equal`) or is not `name`.
    pub fn oifname(name: &str, equal: bool) -> Vec<Expr> {
        vec![
            Expr::Meta(MetaKey::OifName),
            Expr::Cmp {
                equal,
                data: name_data(name),
            },
        ]
    }

    /// The layer 4 protocol is `proto` (6 TCP, 17 UDP).
    pub fn l4proto(proto: u8) -> Vec<Expr> {
        vec![
            Expr::Meta(MetaKey::L4Proto),
            Expr::Cmp {
                equal: true,
                data: vec![proto],
            },
        ]
    }

    fn addr_in(offset: u32, net: Ipv4Net, equal: bool) -> Vec<Expr> {
        let mask = match net.prefix_len() {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n)),
        };
        let mut v = vec![Expr::Payload {
            network: true,
            offset,
            len: 4,
        }];
        if net.prefix_len() < 32 {
            v.push(Expr::Mask(mask.to_be_bytes().to_vec()));
        }
        v.push(Expr::Cmp {
            equal,
            data: net.network().octets().to_vec(),
        });
        v
    }

    /// The destination address is (`equal`) or is not in `net`.
    pub fn daddr_in(net: Ipv4Net, equal: bool) -> Vec<Expr> {
        addr_in(16, net, equal)
    }

    /// The source address is `addr`.
    pub fn saddr(addr: Ipv4Addr) -> Vec<Expr> {
        addr_in(12, host(addr), true)
    }

    /// The destination address is `addr`.
    pub fn daddr(addr: Ipv4Addr) -> Vec<Expr> {
        addr_in(16, host(addr), true)
    }

    fn host(addr: Ipv4Addr) -> Ipv4Net {
        Ipv4Net::new(addr, 32).unwrap_or_else(|| unreachable!("a /32 has no host bits"))
    }

    /// The packet's socket belongs to `uid` (locally generated packets with a full socket).
    pub fn skuid(uid: u32) -> Vec<Expr> {
        vec![
            Expr::Meta(MetaKey::SkUid),
            Expr::Cmp {
                equal: true,
                data: uid.to_ne_bytes().to_vec(),
            },
        ]
    }

    /// `ct state` has any of `bits`.
    pub fn ct_state(bits: u32) -> Vec<Expr> {
        vec![
            Expr::CtState,
            Expr::Mask(bits.to_ne_bytes().to_vec()),
            Expr::Cmp {
                equal: false,
                data: 0u32.to_ne_bytes().to_vec(),
            },
        ]
    }
}

/// One table of the `ip` family with its chains and rules, written whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub table: String,
    pub chains: Vec<Chain>,
    /// (chain, expressions), in order.
    pub rules: Vec<(String, Vec<Expr>)>,
}

impl Ruleset {
    pub fn new(table: &str) -> Ruleset {
        Ruleset {
            table: table.to_owned(),
            ..Ruleset::default()
        }
    }

    pub fn base_chain(&mut self, name: &str, hook: Hook, priority: i32, ty: ChainType) {
        self.chains.push(Chain {
            name: name.to_owned(),
            base: Some((hook, priority, ty, true)),
        });
    }

    pub fn chain(&mut self, name: &str) {
        self.chains.push(Chain {
            name: name.to_owned(),
            base: None,
        });
    }

    /// A rule: the conditions, all of which must hold, then `last` (a verdict or an action).
    pub fn rule(&mut self, chain: &str, conditions: &[Vec<Expr>], last: Expr) {
        let mut exprs: Vec<Expr> = conditions.iter().flatten().cloned().collect();
        exprs.push(last);
        self.rules.push((chain.to_owned(), exprs));
    }
}

/// Netlink attributes, appended in order.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.0.len() & 3 != 0 {
            self.0.push(0);
        }
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.put(ty, &data);
    }

    fn u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.put(ty | NLA_F_NESTED, &inner.0);
    }
}

fn expr_attrs(a: &mut Attrs, expr: &Expr) {
    let (name, data): (&str, Attrs) = {
        let mut d = Attrs::default();
        let name = match expr {
            Expr::Meta(key) => {
                d.u32(1, REG_1); // NFTA_META_DREG
                d.u32(2, *key as u32); // NFTA_META_KEY
                "meta"
            }
            Expr::Cmp { equal, data } => {
                d.u32(1, REG_1); // NFTA_CMP_SREG
                d.u32(2, if *equal { 0 } else { 1 }); // NFTA_CMP_OP: EQ, NEQ
                d.nest(3, |v| v.put(NFTA_DATA_VALUE, data)); // NFTA_CMP_DATA
                "cmp"
            }
            Expr::Payload {
                network,
                offset,
                len,
            } => {
                d.u32(1, REG_1); // NFTA_PAYLOAD_DREG
                d.u32(2, if *network { 1 } else { 2 }); // NFTA_PAYLOAD_BASE
                d.u32(3, *offset); // NFTA_PAYLOAD_OFFSET
                d.u32(4, *len); // NFTA_PAYLOAD_LEN
                "payload"
            }
            Expr::Mask(mask) => {
                d.u32(1, REG_1); // NFTA_BITWISE_SREG
                d.u32(2, REG_1); // NFTA_BITWISE_DREG
                d.u32(3, mask.len() as u32); // NFTA_BITWISE_LEN
                d.nest(4, |v| v.put(NFTA_DATA_VALUE, mask)); // NFTA_BITWISE_MASK
                d.nest(5, |v| v.put(NFTA_DATA_VALUE, &vec![0; mask.len()])); // NFTA_BITWISE_XOR
                "bitwise"
            }
            Expr::CtState => {
                d.u32(1, REG_1); // NFTA_CT_DREG
                d.u32(2, 0); // NFTA_CT_KEY: NFT_CT_STATE
                "ct"
            }
            Expr::Verdict(v) => {
                d.u32(1, REG_VERDICT); // NFTA_IMMEDIATE_DREG
                d.nest(2, |data| {
                    // NFTA_IMMEDIATE_DATA
                    data.nest(NFTA_DATA_VERDICT, |verdict| {
                        let (code, chain) = match v {
                            Verdict::Accept => (1u32, None),
                            Verdict::Drop => (0, None),
                            Verdict::Jump(c) => ((-3i32) as u32, Some(c)),
                        };
                        verdict.u32(NFTA_VERDICT_CODE, code);
                        if let Some(c) = chain {
                            verdict.str(NFTA_VERDICT_CHAIN, c);
                        }
                    })
                });
                "immediate"
            }
            Expr::Redirect(_) | Expr::Reject { .. } | Expr::Masquerade => {
                unreachable!("expanded by rule_exprs")
            }
        };
        (name, d)
    };
    a.nest(NFTA_LIST_ELEM, |elem| {
        elem.str(NFTA_EXPR_NAME, name);
        elem.nest(NFTA_EXPR_DATA, |d| d.0.extend_from_slice(&data.0));
    });
}

/// Append the expression list of one rule (actions expand to their register loads).
fn rule_exprs(list: &mut Attrs, exprs: &[Expr]) {
    for expr in exprs {
        match expr {
            Expr::Redirect(port) => {
                // immediate: register 1 = the port (network order); redir from register 1.
                list.nest(NFTA_LIST_ELEM, |elem| {
                    elem.str(NFTA_EXPR_NAME, "immediate");
                    elem.nest(NFTA_EXPR_DATA, |d| {
                        d.u32(1, REG_1);
                        d.nest(2, |v| v.put(NFTA_DATA_VALUE, &port.to_be_bytes()));
                    });
                });
                list.nest(NFTA_LIST_ELEM, |elem| {
                    elem.str(NFTA_EXPR_NAME, "redir");
                    elem.nest(NFTA_EXPR_DATA, |d| {
                        d.u32(1, REG_1); // NFTA_REDIR_REG_PROTO_MIN
                        d.u32(2, REG_1); // NFTA_REDIR_REG_PROTO_MAX
                    });
                });
            }
            Expr::Reject { tcp_reset } => list.nest(NFTA_LIST_ELEM, |elem| {
                elem.str(NFTA_EXPR_NAME, "reject");
                elem.nest(NFTA_EXPR_DATA, |d| {
                    // NFTA_REJECT_TYPE: NFT_REJECT_TCP_RST or NFT_REJECT_ICMP_UNREACH
                    d.u32(1, if *tcp_reset { 1 } else { 0 });
                    // NFTA_REJECT_ICMP_CODE: port unreachable
                    d.put(2, &[3]);
                });
            }),
            Expr::Masquerade => list.nest(NFTA_LIST_ELEM, |elem| {
                elem.str(NFTA_EXPR_NAME, "masq");
                elem.nest(NFTA_EXPR_DATA, |_| {});
            }),
            other => expr_attrs(list, other),
        }
    }
}

/// A batch of nftables messages being built, each with the step it stands for.
struct Batch {
    buf: Vec<u8>,
    steps: Vec<(u32, String)>,
    seq: u32,
}

impl Batch {
    fn new(seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            steps: Vec::new(),
            seq,
        };
        b.message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            &Attrs::default(),
            None,
        );
        b
    }

    fn message(&mut self, ty: u16, flags: u16, family: u8, attrs: &Attrs, step: Option<String>) {
        let len = 16 + 4 + attrs.0.len();
        let seq = self.seq;
        self.seq += 1;
        self.buf.extend_from_slice(&(len as u32).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg: family, version, res_id (big endian; the subsystem for a batch)
        self.buf.push(family);
        self.buf.push(0);
        let res_id = if ty == NFNL_MSG_BATCH_BEGIN || ty == NFNL_MSG_BATCH_END {
            NFNL_SUBSYS_NFTABLES
        } else {
            0
        };
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(&attrs.0);
        if let Some(step) = step {
            self.steps.push((seq, step));
        }
    }

    fn nft(&mut self, msg: u16, flags: u16, attrs: &Attrs, step: String) {
        self.message(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            FAMILY_IP,
            attrs,
            Some(step),
        );
    }

    fn table(&mut self, msg: u16, name: &str, step: &str) {
        let mut a = Attrs::default();
        a.str(NFTA_TABLE_NAME, name);
        let flags = if msg == NFT_MSG_NEWTABLE {
            NLM_F_CREATE
        } else {
            0
        };
        self.nft(msg, flags, &a, format!("{step} table {name}"));
    }

    fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        self.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            &Attrs::default(),
            None,
        );
        (self.buf, self.steps)
    }
}

/// A netfilter netlink socket in one network namespace.
pub struct Nft {
    fd: OwnedFd,
    seq: u32,
}

impl Nft {
    /// Open a socket in the network namespace the calling thread is in now.
    pub fn connect_here() -> Result<Nft, NftError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(NftError::Socket)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NftError::Socket)?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
                tv_usec: 0,
            }),
        )
        .map_err(NftError::Socket)?;
        Ok(Nft { fd, seq: 1 })
    }

    /// Write `ruleset` whole, replacing any table of the same name, atomically.
    pub fn replace(&mut self, ruleset: &Ruleset) -> Result<(), NftError> {
        let mut b = Batch::new(self.seq);
        b.table(NFT_MSG_NEWTABLE, &ruleset.table, "creating");
        b.table(NFT_MSG_DELTABLE, &ruleset.table, "clearing");
        b.table(NFT_MSG_NEWTABLE, &ruleset.table, "creating");
        for chain in &ruleset.chains {
            let mut a = Attrs::default();
            a.str(NFTA_CHAIN_TABLE, &ruleset.table);
            a.str(NFTA_CHAIN_NAME, &chain.name);
            if let Some((hook, priority, ty, accept)) = chain.base {
                a.nest(NFTA_CHAIN_HOOK, |h| {
                    h.u32(NFTA_HOOK_HOOKNUM, hook as u32);
                    h.u32(NFTA_HOOK_PRIORITY, priority as u32);
                });
                a.u32(NFTA_CHAIN_POLICY, u32::from(accept));
                a.str(
                    NFTA_CHAIN_TYPE,
                    match ty {
                        ChainType::Filter => "filter",
                        ChainType::Nat => "nat",
                    },
                );
            }
            b.nft(
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                &a,
                format!("creating chain {}", chain.name),
            );
        }
        for (i, (chain, exprs)) in ruleset.rules.iter().enumerate() {
            let mut a = Attrs::default();
            a.str(NFTA_RULE_TABLE, &ruleset.table);
            a.str(NFTA_RULE_CHAIN, chain);
            a.nest(NFTA_RULE_EXPRESSIONS, |list| rule_exprs(list, exprs));
            b.nft(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                &a,
                format!("rule {i} of chain {chain}"),
            );
        }
        self.send_batch(b)
    }

    /// Delete the table `name` if it exists.
    pub fn delete_table(&mut self, name: &str) -> Result<(), NftError> {
        let mut b = Batch::new(self.seq);
        b.table(NFT_MSG_NEWTABLE, name, "creating");
        b.table(NFT_MSG_DELTABLE, name, "deleting");
        self.send_batch(b)
    }

    /// The names of this namespace's `ip` tables.
    #[cfg(test)]
    pub fn tables(&mut self) -> Result<Vec<String>, NftError> {
        let mut b = Batch::new(self.seq);
        b.buf.clear();
        b.message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_DUMP,
            FAMILY_IP,
            &Attrs::default(),
            None,
        );
        self.seq = b.seq;
        send(self.fd.as_raw_fd(), &b.buf, MsgFlags::empty()).map_err(NftError::Send)?;
        let mut names = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(NftError::Receive)?;
            for (ty, payload) in messages(&buf[..n])? {
                match ty {
                    NLMSG_DONE => return Ok(names),
                    NLMSG_ERROR => {
                        let errno = error_code(payload)?;
                        if errno != 0 {
                            return Err(NftError::Refused {
                                step: "listing tables".into(),
                                source: nix::errno::Errno::from_raw(-errno),
                            });
                        }
                    }
                    _ => {
                        // nfgenmsg, then attributes.
                        let attrs = payload.get(4..).ok_or(NftError::Malformed)?;
                        for (aty, data) in attributes(attrs) {
                            if aty & !NLA_F_NESTED == NFTA_TABLE_NAME {
                                let name = data.split(|b| *b == 0).next().unwrap_or(&[]);
                                names.push(String::from_utf8_lossy(name).into_owned());
                            }
                        }
                    }
                }
            }
        }
    }

    fn send_batch(&mut self, batch: Batch) -> Result<(), NftError> {
        self.seq = batch.seq + 1;
        let (buf, steps) = batch.finish();
        send(self.fd.as_raw_fd(), &buf, MsgFlags::empty()).map_err(NftError::Send)?;
        let mut pending: Vec<u32> = steps.iter().map(|(s, _)| *s).collect();
        let mut rbuf = vec![0u8; 65536];
        while !pending.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut rbuf, MsgFlags::empty())
                .map_err(NftError::Receive)?;
            for (ty, payload) in messages(&rbuf[..n])? {
                if ty != NLMSG_ERROR {
                    continue;
                }
                let errno = error_code(payload)?;
                // struct nlmsgerr: error, then the header of the message it answers.
                let seq = payload
                    .get(12..16)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .ok_or(NftError::Malformed)?;
                if errno != 0 {
                    let step = steps
                        .iter()
                        .find(|(s, _)| *s == seq)
                        .map(|(_, step)| step.clone())
                        .unwrap_or_else(|| format!("message {seq}"));
                    return Err(NftError::Refused {
                        step,
                        source: nix::errno::Errno::from_raw(-errno),
                    });
                }
                pending.retain(|s| *s != seq);
            }
        }
        Ok(())
    }
}

fn error_code(payload: &[u8]) -> Result<i32, NftError> {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or(NftError::Malformed)
}

/// The netlink messages in a datagram: (type, payload after the header).
fn messages(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, NftError> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return Err(NftError::Malformed);
        }
        out.push((ty, &buf[16..len]));
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The attributes in `buf`: (type, data).
#[cfg(test)]
fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]);
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((ty, &buf[4..len]));
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested() {
        let mut a = Attrs::default();
        a.str(1, "abc");
        a.nest(2, |n| n.u32(1, 7));
        // "abc\0": 4 + 4 bytes; the nest: 4 + (4 + 4).
        assert_eq!(a.0.len(), 8 + 12);
        let parsed = attributes(&a.0);
        assert_eq!(parsed[0], (1, &b"abc\0"[..]));
        assert_eq!(parsed[1].0, 2 | NLA_F_NESTED);
        assert_eq!(attributes(parsed[1].1), vec![(1, &7u32.to_be_bytes()[..])]);
    }

    #[test]
    fn a_batch_is_framed_by_begin_and_end() {
        let mut b = Batch::new(10);
        b.table(NFT_MSG_NEWTABLE, "t", "creating");
        let (buf, steps) = b.finish();
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[1].0, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE);
        assert_eq!(msgs[2].0, NFNL_MSG_BATCH_END);
        assert_eq!(steps, vec![(11, "creating table t".to_owned())]);
    }

    #[test]
    fn subnet_matches_mask_then_compare() {
        let net = "10.88.0.0/16".parse().unwrap();
        let m = matches::daddr_in(net, false);
        assert_eq!(
            m,
            vec![
                Expr::Payload {
                    network: true,
                    offset: 16,
                    len: 4
                },
                Expr::Mask(vec![255, 255, 0, 0]),
                Expr::Cmp {
                    equal: false,
                    data: vec![10, 88, 0, 0]
                },
            ]
        );
    }

    /// Against the kernel: a table written, listed, replaced and deleted, in a namespace of
    /// the test's own (needs root; skipped otherwise).
    #[test]
    fn the_kernel_takes_a_ruleset() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        #[allow(
            clippy::disallowed_methods,
            reason = "a test's own thread: the namespace it unshares is its alone"
        )]
        let result = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut nft = Nft::connect_here().unwrap();
            let mut rs = Ruleset::new("sandboxd_test");
            rs.base_chain("pre", Hook::Prerouting, -150, ChainType::Filter);
            rs.base_chain("nat", Hook::Prerouting, -100, ChainType::Nat);
            rs.base_chain("post", Hook::Postrouting, 100, ChainType::Nat);
            rs.base_chain("in", Hook::Input, 0, ChainType::Filter);
            rs.base_chain("out", Hook::Output, 0, ChainType::Filter);
            rs.chain("sbx");
            rs.rule(
                "out",
                &[matches::oifname("uplink0", true), matches::skuid(999)],
                Expr::Verdict(Verdict::Accept),
            );
            let net = "10.88.0.0/16".parse().unwrap();
            rs.rule(
                "pre",
                &[matches::iifname_prefix("br")],
                Expr::Verdict(Verdict::Jump("sbx".into())),
            );
            rs.rule(
                "sbx",
                &[matches::daddr_in(net, true)],
                Expr::Verdict(Verdict::Accept),
            );
            rs.rule(
                "sbx",
                &[matches::l4proto(6)],
                Expr::Verdict(Verdict::Accept),
            );
            rs.rule("sbx", &[], Expr::Reject { tcp_reset: false });
            rs.rule(
                "nat",
                &[
                    matches::iifname_prefix("br"),
                    matches::daddr_in(net, false),
                    matches::l4proto(6),
                ],
                Expr::Redirect(15001),
            );
            rs.rule(
                "post",
                &[
                    matches::saddr("100.127.255.254".parse().unwrap()),
                    matches::oifname("sbxup0", false),
                ],
                Expr::Masquerade,
            );
            rs.rule(
                "in",
                &[
                    matches::iifname("uplink0"),
                    matches::ct_state(CT_ESTABLISHED | CT_RELATED),
                ],
                Expr::Verdict(Verdict::Accept),
            );
            rs.rule(
                "in",
                &[
                    matches::iifname("uplink0"),
                    matches::l4proto(17),
                    matches::daddr("10.88.0.1".parse().unwrap()),
                ],
                Expr::Verdict(Verdict::Drop),
            );
            nft.replace(&rs).unwrap();
            let first = nft.tables().unwrap();
            // Replaced whole, not merged: a second write is the same table again.
            nft.replace(&rs).unwrap();
            let second = nft.tables().unwrap();
            // A rule the kernel refuses names its step.
            let mut bad = Ruleset::new("sandboxd_test");
            bad.base_chain("in", Hook::Input, 0, ChainType::Filter);
            bad.rule("nowhere", &[], Expr::Verdict(Verdict::Accept));
            let refused = nft.replace(&bad).unwrap_err().to_string();
            let after_refusal = nft.tables().unwrap();
            nft.delete_table("sandboxd_test").unwrap();
            nft.delete_table("sandboxd_test").unwrap();
            let gone = nft.tables().unwrap();
            (first, second, refused, after_refusal, gone)
        })
        .join()
        .unwrap();
        assert_eq!(result.0, vec!["sandboxd_test".to_owned()]);
        assert_eq!(result.1, vec!["sandboxd_test".to_owned()]);
        assert!(result.2.contains("rule 0 of chain nowhere"), "{}", result.2);
        // The refused batch changed nothing.
        assert_eq!(result.3, vec!["sandboxd_test".to_owned()]);
        assert!(result.4.is_empty(), "{:?}", result.4);
    }
}
