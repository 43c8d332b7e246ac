//! What guards and serves the endpoints: tokens, TLS, health and reflection for clients that are not ours.

use super::*;

#[tokio::test]
async fn tokens_guard_their_services_and_probes_stay_open() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let hb = HeartbeatRequest { worker_id: "w".into(), ..Default::default() };
    for (token, want) in [
        (None, Some(Code::Unauthenticated)),
        (Some("wrong"), Some(Code::Unauthenticated)),
        (Some(WORKER_TOKEN), None),
        (Some(ADMIN_TOKEN), None),
    ] {
        let r = worker_client(&c, token).await.heartbeat(hb.clone()).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Coordinator with {token:?}: {r:?}");
    }
    for (token, want) in [
        (None, Some(Code::Unauthenticated)),
        (Some("wrong"), Some(Code::Unauthenticated)),
        (Some(WORKER_TOKEN), Some(Code::PermissionDenied)),
        (Some(ADMIN_TOKEN), None),
    ] {
        let r = admin_client(&c, token).await.get_status(GetStatusRequest::default()).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Control with {token:?}: {r:?}");
        let r = admin_client(&c, token).await.pause(ControlRequest {}).await;
        assert_eq!(r.as_ref().err().map(Status::code), want, "Control.Pause with {token:?}: {r:?}");
    }
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut health = HealthClient::new(channel(&c).await);
    for service in ["", "albef.v1.Coordinator", "albef.v1.Control"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "health of {service:?}");
    }

    // Without token files, authentication is off (and says so). A run directory of its own: the
    // first coordinator holds the shared one.
    let own_run = format!("job.run_dir={}", dir.path("run-open").display());
    let open =
        dir.start(1, &["coordinator.worker_token_file=".into(), "coordinator.admin_token_file=".into(), own_run]);
    admin_client(&open, None).await.get_status(GetStatusRequest::default()).await.unwrap();
    assert!(open.log().contains("authentication is OFF"));
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca() {
    let dir = JobDir::new();
    let p = |name: &str| dir.path(name).display().to_string();
    std::fs::write(dir.path("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: Vec<Vec<String>> = vec![
        [
            &["req", "-x509"][..],
            &ec,
            &["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "2", "-subj", "/CN=albef test CA"],
        ]
        .concat(),
        [&["req"][..], &ec, &["-keyout", &p("server.key"), "-out", &p("server.csr"), "-subj", "/CN=127.0.0.1"]]
            .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.pem"),
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl makes the test certificates (apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out.stderr));
    }
    let c = dir.start(
        1,
        &[format!("coordinator.tls_cert={}", p("server.pem")), format!("coordinator.tls_key={}", p("server.key"))],
    );
    let endpoint = format!("https://{}", c.addr);

    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(p("ca.pem")).unwrap()));
    let channel = Endpoint::from_shared(endpoint.clone()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let status = ControlClient::with_interceptor(channel, Token(Some(ADMIN_TOKEN)))
        .get_status(GetStatusRequest::default())
        .await;
    assert_eq!(status.unwrap().into_inner().state, "waiting");

    let out = ctl(&["--endpoint", &endpoint, "--ca", &p("ca.pem"), "--token-file", &p("admin.token"), "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &p("admin.token"), "status"]);
    assert_eq!(out.status.code(), Some(3), "a server nobody vouched for: {}", text(&out.stderr));
}

#[tokio::test]
async fn a_grpc_client_that_is_not_ours_sees_health_and_reflection() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv/bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        panic!(
            "{} lacks grpcio, grpcio-health-checking or grpcio-reflection: run `make setup` ({:?})",
            python.display(),
            probe.map(|o| text(&o.stderr))
        );
    }
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let out = Command::new(&python).arg(root.join("tests/python/grpc_check.py")).arg(&c.addr).output().unwrap();
    let report = text(&out.stdout);
    assert!(out.status.success(), "grpc_check.py failed:\n{report}\n{}", text(&out.stderr));
    let found: serde_json::Value = serde_json::from_str(&report).unwrap();
    for version in ["v1", "v1alpha"] {
        let listed = found["reflection"][version].as_array().unwrap();
        for service in ["albef.v1.Coordinator", "albef.v1.Control", "grpc.health.v1.Health"] {
            assert!(listed.iter().any(|s| s == service), "reflection {version} lacks {service}: {listed:?}");
        }
    }
    assert!(found["methods"]["albef.v1.Coordinator"].as_array().unwrap().iter().any(|m| m == "Join"));
    assert_eq!(found["health"][""], "SERVING");
}
