//! The worker protocol: joins, heartbeats (calls and streams), leases, failures, malformed requests.

use super::*;

#[tokio::test]
async fn two_workers_join_heartbeat_and_get_their_leases() {
    let dir = JobDir::new();
    let c = dir.start(2, &[]);
    let (mut a, ja, mut b, jb) = forms_a_world_of_two(&c).await;
    assert_eq!((ja.generation, jb.generation), (1, 1));
    assert_eq!(BTreeSet::from([ja.rank, jb.rank]), BTreeSet::from([0, 1]));
    assert_eq!((ja.world_size, jb.world_size), (2, 2));
    let (ca, cb) = (ja.collective.clone().unwrap(), jb.collective.clone().unwrap());
    assert_eq!((ca.backend, &ca.token, ca.timeout_seconds), (cb.backend, &cb.token, cb.timeout_seconds));
    assert_eq!(ca.backend(), CollectiveBackend::Tcp);
    // In a ring of two, each rank's neighbours are the other rank.
    assert_eq!((ca.next_address.as_str(), ca.prev_address.as_str()), ("127.0.0.1:7002", "127.0.0.1:7002"));
    assert_eq!((cb.next_address.as_str(), cb.prev_address.as_str()), ("127.0.0.1:7001", "127.0.0.1:7001"));
    assert_eq!(ca.token.len(), 32);
    assert_eq!(ja.resume.clone().unwrap().checkpoint, "");
    let config: serde_json::Value = serde_json::from_str(&ja.config_json).unwrap();
    assert_eq!(config["job"]["min_workers"], 2);

    // a beats on a stream, as albef-worker does; b with single calls.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut stream = a.heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for step in 1..3 {
        tx.send(beat("worker-a", &ja, step)).await.unwrap();
        let ra = stream.message().await.unwrap().expect("a reply to each beat");
        let rb = b.heartbeat(beat("worker-b", &jb, step)).await.unwrap().into_inner();
        assert!(ra.commands.is_empty() && rb.commands.is_empty());
        assert_eq!((ra.generation, rb.generation), (1, 1));
    }
    // A beat that is not valid ends the stream with the reason.
    tx.send(HeartbeatRequest { lr: f64::NAN, ..beat("worker-a", &ja, 3) }).await.unwrap();
    let refused = stream.message().await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("lr NaN is not finite"), "{refused:?}");
    let mut leased = 0;
    for (w, j) in [(&mut a, &ja), (&mut b, &jb)] {
        let l = w
            .get_leases(GetLeasesRequest { generation: 1, rank: j.rank, epoch: 0, virtual_rank: j.rank })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((l.world_size, l.batch_size, l.steps, l.seed), (2, 4, SAMPLES / 8, 42));
        leased += l.leases.iter().map(|x| x.end - x.start).sum::<u64>();
    }
    assert_eq!(leased, SAMPLES / 8 * 8, "the ranks' leases cover the epoch's samples once");

    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.state.as_str(), status.generation, status.world_size, status.step), ("running", 1, 2, 2));
    assert_eq!(status.workers.len(), 2);
    assert_eq!(status.images_per_second, 20.0);
}

#[tokio::test]
async fn a_silent_worker_ends_the_generation_and_the_other_gets_rejoin() {
    let dir = JobDir::new();
    let c = dir.start(2, &[]);
    let (mut a, ja, mut b, jb) = forms_a_world_of_two(&c).await;
    b.heartbeat(beat("worker-b", &jb, 1)).await.unwrap();
    // Only a keeps reporting; b's silence passes the 1.5 s timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut step = 1;
    loop {
        let r = a.heartbeat(beat("worker-a", &ja, step)).await.unwrap().into_inner();
        if commands(&r) == vec![Cmd::Rejoin] {
            break;
        }
        assert!(r.commands.is_empty(), "{r:?}");
        assert!(Instant::now() < deadline, "no REJOIN after b went silent");
        step += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = b.heartbeat(beat("worker-b", &jb, 2)).await.unwrap().into_inner();
    assert_eq!(commands(&late), vec![Cmd::Rejoin]);
    let status =
        admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.state.as_str(), status.restarts), ("waiting", 1));
    assert!(c.log().contains("generation ended"), "the end is logged");

    // Both rejoin: generation 2, same ranks.
    let (_, ja2, _, jb2) = forms_a_world_of_two(&c).await;
    assert_eq!((ja2.generation, ja2.rank, jb2.rank), (2, ja.rank, jb.rank));
}

/// The call was refused as INVALID_ARGUMENT, with a reason.
#[track_caller]
fn invalid<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert!(!e.message().is_empty(), "{what}: no reason given");
        }
    }
}

/// Refused as INVALID_ARGUMENT with a message that repeats the start of a client's long string
/// (`shows`) and stays one line of a few hundred bytes (grpcio takes 8 KiB of metadata, and
/// answers RESOURCE_EXHAUSTED to more).
#[track_caller]
fn clipped<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, what: &str, shows: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::InvalidArgument, "{what}: {:?}", e.code());
    let m = e.message();
    assert!(m.len() < 1024 && m.contains(shows), "{what}: {m:.800}");
    assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{what}: control characters in {m:.800}");
}

#[tokio::test]
async fn errors_and_logs_repeat_a_clients_long_strings_clipped() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    // A megabyte, with a line break and a terminal escape in it (shown as spaces).
    let long = format!("long \u{1b}[31m\n{}", "y".repeat(1 << 20));
    let shows = "long  [31m yyy";
    let base = join_request("w", 7000);
    clipped(w.join(JoinRequest { device_kind: long.clone(), ..base.clone() }).await, "device_kind", shows);
    let mut admin = admin_client(&c, Some(ADMIN_TOKEN)).await;
    let page = GetStatusRequest { all_workers: true, page_token: long.clone(), ..Default::default() };
    clipped(admin.get_status(page).await, "page_token", shows);
    let j = join(&mut w, "w", 7000).await;
    // Within the 4 KiB a location may have, but not where checkpoints belong.
    let location = format!("/elsewhere/{}", "y".repeat(4000));
    let ck = ReportCheckpointRequest { generation: j.generation, location: location.clone(), ..Default::default() };
    clipped(w.report_checkpoint(ck).await, "checkpoint location", "/elsewhere/yyy");
    // A rank that cannot read a checkpoint ends the generation; the log says why, clipped.
    let reason = long[..16 * 1024].to_string();
    let reject = RejectCheckpointRequest { generation: j.generation, rank: 0, location, reason };
    w.reject_checkpoint(reject).await.unwrap();
    let log = c.log();
    assert!(log.contains("generation ended"), "{log:.2000}");
    assert!(!log.contains(&"y".repeat(1000)) && !log.contains('\u{1b}'), "an unclipped string in the log");
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let dir = JobDir::new();
    let c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let base = join_request("w", 7000);
    invalid(w.join(JoinRequest { worker_id: String::new(), ..base.clone() }).await, "empty worker_id");
    invalid(w.join(JoinRequest { worker_id: "x".repeat(10_000), ..base.clone() }).await, "long worker_id");
    invalid(w.join(JoinRequest { device_kind: "tpu".into(), ..base.clone() }).await, "device_kind");
    invalid(w.join(JoinRequest { collective_address: "nohost".into(), ..base.clone() }).await, "address");
    invalid(w.join(JoinRequest { node_id: "n".repeat(10_000), ..base.clone() }).await, "long node_id");
    invalid(w.join(JoinRequest { local_rank: 5000, ..base.clone() }).await, "local_rank");
    invalid(w.get_leases(GetLeasesRequest { generation: 0, ..Default::default() }).await, "no generation");

    let j = join(&mut w, "w", 7000).await;
    assert_eq!((j.generation, j.rank, j.world_size), (1, 0, 1));
    let leases =
        w.get_leases(GetLeasesRequest { generation: 1, epoch: 3, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!((leases.steps, leases.epoch), (SAMPLES / 4, 3));
    for (req, what) in [
        (GetLeasesRequest { generation: 1, rank: 3, ..Default::default() }, "rank outside the world"),
        (GetLeasesRequest { generation: 9, ..Default::default() }, "unknown generation"),
        (GetLeasesRequest { generation: 1, virtual_rank: 1, ..Default::default() }, "not one of its virtual ranks"),
    ] {
        invalid(w.get_leases(req).await, what);
    }
    let hb = beat("w", &j, 1);
    invalid(w.heartbeat(HeartbeatRequest { worker_id: String::new(), ..hb.clone() }).await, "heartbeat without id");
    invalid(w.heartbeat(HeartbeatRequest { images_per_second: f64::NAN, ..hb.clone() }).await, "NaN rate");
    invalid(w.heartbeat(HeartbeatRequest { lr: f64::INFINITY, ..hb.clone() }).await, "infinite lr");
    invalid(w.heartbeat(HeartbeatRequest { busy_seconds: -1.0, ..hb.clone() }).await, "negative step time");
    invalid(w.heartbeat(HeartbeatRequest { data_wait_share: 1.5, ..hb.clone() }).await, "a share over 1");
    let nan = Some(albef_proto::v1::Losses { terms: [("itm".into(), f64::NAN)].into(), total: 1.0 });
    invalid(w.heartbeat(HeartbeatRequest { losses: nan, ..hb.clone() }).await, "NaN loss");
    invalid(w.heartbeat(HeartbeatRequest { rank: 5, ..hb.clone() }).await, "heartbeat rank");
    let reasons = [("made_up_reason".to_string(), 1)].into();
    invalid(w.heartbeat(HeartbeatRequest { bad_samples: reasons, ..hb.clone() }).await, "unknown skip reason");
    let example = SkippedSample { reason: "corrupt_image".into(), source: "s.tar".into(), ..Default::default() };
    let many = vec![example.clone(); 1000];
    invalid(w.heartbeat(HeartbeatRequest { bad_sample_examples: many, ..hb.clone() }).await, "1000 examples");
    let long = SkippedSample { key: "k".repeat(5000), ..example };
    invalid(w.heartbeat(HeartbeatRequest { bad_sample_examples: vec![long], ..hb.clone() }).await, "a long key");
    invalid(w.publish_nccl_id(PublishNcclIdRequest { generation: 1, nccl_id: vec![1, 2, 3] }).await, "short NCCL id");
    invalid(w.get_nccl_id(GetNcclIdRequest { generation: 9 }).await, "NCCL id of an unknown generation");
    let ck = ReportCheckpointRequest { generation: 1, rank: 0, step: 1, ..Default::default() };
    invalid(w.report_checkpoint(ck.clone()).await, "empty location");
    invalid(
        w.report_checkpoint(ReportCheckpointRequest { location: "/tmp/x".into(), ..ck.clone() }).await,
        "elsewhere",
    );
    // In its place but without a manifest: not a checkpoint.
    let location = format!("{}/checkpoints/step-1", dir.path("run").display());
    let status = w.report_checkpoint(ReportCheckpointRequest { location, ..ck }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    invalid(w.leave(LeaveRequest { worker_id: String::new(), generation: 1 }).await, "leave without id");

    let mut admin = admin_client(&c, Some(ADMIN_TOKEN)).await;
    invalid(admin.watch_status(WatchStatusRequest { interval_ms: 1 }).await, "1 ms interval");
    // 0 means the default interval: a stream of statuses.
    let mut stream = admin.watch_status(WatchStatusRequest { interval_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().state, "running");
}
