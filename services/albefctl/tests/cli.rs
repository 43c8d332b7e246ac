//! albefctl's exit codes where no coordinator is needed (the coordinator's tests drive it
//! against a real one). Having this test also makes `cargo test` build the albefctl binary that
//! those tests run.

use std::process::{Command, Output};

fn albefctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_albefctl"))
        .args(args)
        .env_remove("ALBEF_ENDPOINT")
        .env_remove("ALBEF_ADMIN_TOKEN_FILE")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(albefctl(&[]).status.code(), Some(2));
    assert_eq!(albefctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(albefctl(&["--endpoint", "not a url", "status"]).status.code(), Some(2));
    let help = albefctl(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("checkpoints"));
}

#[test]
fn an_unreachable_coordinator_exits_3() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let out = albefctl(&["--endpoint", &url, "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("cannot reach the coordinator at {url}: ")), "{}", stderr(&out));
    // Printed once, though tonic's connect error repeats its cause's message as its own.
    assert_eq!(stderr(&out).matches("tcp connect error").count(), 1, "{}", stderr(&out));
}

#[test]
fn an_unreadable_token_file_exits_1() {
    let out = albefctl(&["--token-file", "/nonexistent/admin.token", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("/nonexistent/admin.token"));
}
