//! albefctl against the coordinator: reports, control, exit codes, a fleet's status.

use super::*;

#[tokio::test]
async fn albefctl_reports_and_controls_with_exit_codes() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "worker-a", 7000).await;
    w.heartbeat(beat("worker-a", &j, 5)).await.unwrap();
    let location = dir.checkpoint(5);
    let ck =
        ReportCheckpointRequest { generation: 1, rank: 0, step: 5, location, epoch: 0, step_in_epoch: 5, best: true };
    w.report_checkpoint(ck).await.unwrap();

    let endpoint = c.endpoint();
    let admin = dir.path("admin.token").display().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--endpoint", &endpoint, "--token-file", &admin];
        all.extend_from_slice(args);
        ctl(&all)
    };
    let out = run(&["status"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for want in ["state       running", "step        5 / ", "checkpoints/step-5", "worker-a", "hash-5"] {
        assert!(stdout.contains(want), "status lacks {want:?}:\n{stdout}");
    }
    let out = run(&["pause"]);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "state: paused\n".to_string()));
    // A checkpoint asked for while paused says it waits for the resume.
    let out = run(&["checkpoint"]);
    assert!(text(&out.stdout).starts_with("state: paused (the checkpoint is queued"), "{}", text(&out.stdout));
    let out = run(&["checkpoints"]);
    assert_eq!(out.status.code(), Some(0));
    let listed = text(&out.stdout);
    assert!(listed.lines().any(|l| l.contains("checkpoints/step-5") && l.ends_with("best")), "{listed}");
    // The endpoint and token also come from the environment.
    let out = Command::new(albefctl())
        .args(["resume"])
        .env("ALBEF_ENDPOINT", &endpoint)
        .env("ALBEF_ADMIN_TOKEN_FILE", &admin)
        .output()
        .unwrap();
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "state: running\n".to_string()));

    // watch redraws at every update until stopped.
    let mut watch = Command::new(albefctl())
        .args(["--endpoint", &endpoint, "--token-file", &admin, "watch", "--interval-ms", "100"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap()).lines().map_while(Result::ok);
    let updates = lines.filter(|l| l.starts_with("state ")).take(2).count();
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(updates, 2);

    for token in ["worker.token", "wrong.token"] {
        let out = ctl(&["--endpoint", &endpoint, "--token-file", &dir.path(token).display().to_string(), "status"]);
        assert_eq!(out.status.code(), Some(4), "{token}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("the coordinator refused the token"), "{}", text(&out.stderr));
    }
    let out = ctl(&["--endpoint", &endpoint, "status"]);
    assert_eq!(out.status.code(), Some(4), "no token: {}", text(&out.stderr));

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nowhere = format!("http://127.0.0.1:{closed}");
    let out = ctl(&["--endpoint", &nowhere, "--token-file", &admin, "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("cannot reach the coordinator at {nowhere}")), "{}", text(&out.stderr));

    assert_eq!(ctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(ctl(&["--endpoint", "not a url", "status"]).status.code(), Some(2));
}

/// A fleet's status stays small and readable: a summary of the silent and the slowest ranks, and
/// every rank on request, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn albefctl_summarises_a_thousand_workers_and_lists_them_all_on_request() {
    const N: usize = 1000;
    let dir = JobDir::with_samples(N as u64 * 4 * 10);
    let c = dir.start(N as u32, &["job.heartbeat_interval_ms=1000".into(), "job.heartbeat_timeout_ms=30000".into()]);
    // A few connections carry the fleet's calls (each simulated worker is one id).
    let mut clients = vec![];
    for _ in 0..8 {
        clients.push(worker_client(&c, Some(WORKER_TOKEN)).await);
    }
    let joins = (0..N).map(|i| {
        let mut w = clients[i % clients.len()].clone();
        async move {
            let id = format!("gpu-{i:04}");
            let request = JoinRequest { device_kind: "cuda".into(), ..join_request(&id, 7000) };
            let a = loop {
                match w.join(request.clone()).await.unwrap().into_inner().outcome {
                    Some(Outcome::Assigned(a)) => break a,
                    Some(Outcome::Wait(_)) => {}
                    other => panic!("{id}: {other:?}"),
                }
            };
            let params = a.collective.as_ref().unwrap();
            assert!(params.next_address.is_empty() && params.prev_address.is_empty(), "NCCL ranks get no addresses");
            (id, a)
        }
    });
    let world = futures::future::join_all(joins).await;
    // Rank 7 lags behind the others; rank 3 never heartbeats (silent: two intervals without one).
    let beats = |w: &mut Worker, (id, a): &(String, Assignment)| {
        let request = beat(id, a, if a.rank == 7 { 2 } else { 9 });
        let mut w = w.clone();
        async move { w.heartbeat(request).await.unwrap() }
    };
    let speaking: Vec<_> = world.iter().filter(|(_, a)| a.rank != 3).collect();
    for round in 0..2 {
        let calls = speaking.iter().enumerate().map(|(i, member)| beats(&mut clients[i % 8], member));
        futures::future::join_all(calls).await;
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(2100)).await;
        }
    }
    let endpoint = c.endpoint();
    let admin = dir.path("admin.token").display().to_string();
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &admin, "status"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("workers     1000 there, 1 silent, 0 stragglers (16 listed"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("RANK")).skip(1).collect();
    assert_eq!(rows.len(), 16, "{stdout}");
    assert!(rows.iter().any(|r| r.starts_with("3 ")) && rows.iter().any(|r| r.starts_with("7 ")), "{stdout}");
    let out = ctl(&["--endpoint", &endpoint, "--token-file", &admin, "status", "--all", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranks: BTreeSet<u64> =
        json["workers"].as_array().unwrap().iter().map(|w| w["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks.len(), N, "every rank, once");
}
