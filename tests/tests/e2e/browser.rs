//! Browser safety of a localhost daemon: DNS rebinding (Host) and cross-site requests and
//! websocket hijacking (Origin).

use std::net::TcpStream;

use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

fn websocket_status(d: &Daemon, path: &str, origin: Option<&str>) -> u16 {
    let stream = TcpStream::connect(&d.addr).unwrap();
    let mut request = d.ws_request(path);
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tungstenite::client(request, stream) {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            response.status().as_u16()
        }
        Err(e) => panic!("websocket handshake failed: {e}"),
    }
}

#[test]
fn a_rebinding_host_is_refused_and_loopback_names_are_not() {
    require_e2e!();
    let d = Daemon::start_with(Mode::Privileged, &["--allowed-host", "sandboxd.test"]);
    let get = |host: &str| {
        d.request("GET", "/v1/sandboxes")
            .header("Host", host)
            .send()
    };
    let resp = get("evil.example:4280");
    assert_eq!(resp.status, 403);
    let body: Value = resp.json();
    assert_eq!(body["error"]["code"], "forbidden_host", "{body}");
    for ok in ["localhost:4280", "127.0.0.1", "sandboxd.test:4280"] {
        assert_eq!(get(ok).status, 200, "{ok}");
    }
}

#[test]
fn foreign_origins_cannot_change_state_or_open_websockets() {
    require_e2e!();
    let d = Daemon::start_with(
        Mode::Privileged,
        &["--allowed-origin", "https://dash.example"],
    );
    let post = |origin: Option<&str>| {
        let mut req = d
            .request("POST", "/v1/sandboxes")
            .json(&json!({"command": ["true"]}));
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        req.send()
    };
    let resp = post(Some("https://evil.example"));
    assert_eq!(resp.status, 403);
    let body: Value = resp.json();
    assert_eq!(body["error"]["code"], "forbidden_origin", "{body}");
    assert_eq!(post(None).status, 201, "curl and CI send no Origin");
    let created: Value = post(Some("https://dash.example")).json();
    let id = created["id"].as_str().unwrap().to_string();

    let logs = format!("/v1/sandboxes/{id}/logs");
    assert_eq!(
        websocket_status(&d, &logs, Some("https://evil.example")),
        403,
        "cross-site websocket hijacking"
    );
    assert_eq!(websocket_status(&d, &logs, None), 101);
    assert_eq!(
        websocket_status(&d, &logs, Some("https://dash.example")),
        101
    );
    // Nothing was created by the refused request.
    let list: Value = d.get("/v1/sandboxes").json();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}
