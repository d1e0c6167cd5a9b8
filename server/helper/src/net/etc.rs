//! The sandbox's /etc/hosts and /etc/resolv.conf, from its network.

use crate::validate::ValidNet;

/// /etc/hosts: loopback, the sandbox's own name (on its address when bridged), and the other
/// members of its group that existed when it was created.
pub fn hosts(hostname: &str, net: Option<&ValidNet>) -> String {
    let mut text =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    match net {
        None => text.push_str(&format!("127.0.1.1\t{hostname}\n")),
        Some(net) => {
            text.push_str(&format!("{}\t{hostname}\n", net.address));
            for (name, address) in &net.peers {
                if name != hostname {
                    text.push_str(&format!("{address}\t{name}\n"));
                }
            }
        }
    }
    text
}

/// /etc/resolv.conf: with egress, the gateway (the egress filter answers the names the
/// sandbox's policy allows, NXDOMAIN for the rest); without it no name server is reachable from
/// a sandbox (nothing is routed beyond the daemon's bridges), so none is listed, and names of
/// the group resolve through /etc/hosts.
pub fn resolv_conf(net: Option<&ValidNet>) -> String {
    match net {
        None => {
            "# sandboxd: this sandbox has no network (mode \"none\"), so no name servers\n".into()
        }
        Some(ValidNet {
            resolver: Some(gateway),
            ..
        }) => format!(
            "# sandboxd: the gateway answers the names the egress policy allows\n\
             nameserver {gateway}\n"
        ),
        Some(_) => "# sandboxd: bridged network without a way out, so no name servers;\n\
                    # the sandboxes of the group are in /etc/hosts\n"
            .into(),
    }
}

/// A bridged network of sandbox "box" (10.88.0.3) whose group has "db" (10.88.0.2) and a stale
/// entry of its own name, for tests.
#[cfg(test)]
pub fn sample_net() -> ValidNet {
    ValidNet {
        group: Some("g".into()),
        bridge: Some("br0".into()),
        veth: "ve0".into(),
        address: "10.88.0.3".parse().unwrap(),
        prefix_len: 16,
        gateway: "10.88.0.1".parse().unwrap(),
        peers: vec![
            ("db".into(), "10.88.0.2".parse().unwrap()),
            ("box".into(), "10.88.0.9".parse().unwrap()),
        ],
        ports: vec![],
        resolver: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lists_the_sandbox_and_its_group() {
        assert!(hosts("box", None).contains("127.0.1.1\tbox\n"));
        let net = sample_net();
        let text = hosts("box", Some(&net));
        assert!(text.contains("10.88.0.3\tbox\n"));
        assert!(text.contains("10.88.0.2\tdb\n"));
        assert!(!text.contains("10.88.0.9"));
        assert!(resolv_conf(Some(&net)).lines().all(|l| l.starts_with('#')));
        let with_egress = ValidNet {
            resolver: Some(net.gateway),
            ..net
        };
        assert!(resolv_conf(Some(&with_egress)).contains("\nnameserver 10.88.0.1\n"));
    }
}
