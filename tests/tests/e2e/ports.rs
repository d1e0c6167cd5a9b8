//! Published host ports come only from the operator's range (`--publish-ports`): a requested
//! port outside it is 422 naming the range (a tenant cannot take 127.0.0.1:6379), and an
//! unspecified one is chosen inside it. Bridged networking is privileged mode only.
//!
//! Traffic goes only to the host's loopback.

use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::json;

#[test]
fn host_ports_come_only_from_the_publish_range() {
    require_e2e!();
    let d = Daemon::start_with(Mode::Privileged, &["--publish-ports", "41000-41009"]);
    let user = d.create_token("t1", "user");

    // A well-known port, and one just outside the range: 422, nothing created.
    for port in [6379, 40999, 41010] {
        let reply = d
            .request("POST", "/v1/sandboxes")
            .token(Some(&user))
            .json(&json!({"command": ["sleep", "30"],
                "network": {"mode": "bridge", "ports": [{"sandbox": 6379, "host": port}]}}))
            .send();
        assert_eq!(
            reply.assert_error(422, "host port outside the range"),
            "port_not_allowed"
        );
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("41000-41009"), "{message}");
        assert!(message.contains(&port.to_string()), "{message}");
    }
    let listed = d.request("GET", "/v1/sandboxes").token(Some(&user)).send();
    assert_eq!(listed.json()["items"].as_array().unwrap().len(), 0);

    // Unspecified (0 or absent) ports are chosen inside the range, two at once included.
    let mut seen = Vec::new();
    for i in 0..3 {
        let reply = d
            .request("POST", "/v1/sandboxes")
            .token(Some(&user))
            .json(&json!({"name": format!("p{i}"), "command": ["sleep", "30"],
                "network": {"mode": "bridge",
                            "ports": [{"sandbox": 80, "host": 0}, {"sandbox": 81}]}}))
            .send();
        assert_eq!(reply.status, 201, "{}", reply.body);
        let ports = reply.json()["network"]["ports"].as_array().unwrap().clone();
        assert_eq!(ports.len(), 2, "{ports:?}");
        for p in ports {
            let host = p["host"].as_u64().unwrap();
            assert!(
                (41000..=41009).contains(&host),
                "host port {host} outside the range"
            );
            assert!(!seen.contains(&host), "port {host} handed out twice");
            seen.push(host);
        }
    }
    // A port inside the range may still be asked for by number.
    let reply = d
        .request("POST", "/v1/sandboxes")
        .token(Some(&user))
        .json(&json!({"name": "fixed", "command": ["sleep", "30"],
            "network": {"mode": "bridge", "ports": [{"sandbox": 80, "host":
                (41000..=41009).find(|p| !seen.contains(p)).unwrap()}]}}))
        .send();
    assert_eq!(reply.status, 201, "{}", reply.body);
    // The range is full now (3 x 2 + 1 of 10 used; ask for 4 more): 409 port_in_use.
    let reply = d
        .request("POST", "/v1/sandboxes")
        .token(Some(&user))
        .json(&json!({"name": "full", "command": ["sleep", "30"],
            "network": {"mode": "bridge", "ports":
                [{"sandbox": 1}, {"sandbox": 2}, {"sandbox": 3}, {"sandbox": 4}]}}))
        .send();
    assert_eq!(reply.assert_error(409, "range exhausted"), "port_in_use");
}

#[test]
fn the_default_range_is_the_ephemeral_one() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let reply = d
        .request("POST", "/v1/sandboxes")
        .json(&json!({"command": ["true"],
            "network": {"mode": "bridge", "ports": [{"sandbox": 1, "host": 6379}]}}))
        .send();
    assert_eq!(reply.assert_error(422, "port 6379"), "port_not_allowed");
    assert!(reply.body.contains("32768-60999"), "{}", reply.body);
    let s = d.create(json!({"command": ["true"],
        "network": {"mode": "bridge", "ports": [{"sandbox": 1}]}}));
    let host = s.network.as_ref().unwrap().ports[0].host;
    assert!((32768..=60999).contains(&host), "{host}");
}
