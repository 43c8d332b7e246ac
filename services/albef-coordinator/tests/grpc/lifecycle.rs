//! The coordinator process: restarts from its state file, exits once the job is over, shuts down on SIGTERM.

use super::*;

#[tokio::test]
async fn a_restarted_coordinator_keeps_the_generation_and_checkpoints() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let location = dir.checkpoint(7);
    let ck = ReportCheckpointRequest {
        generation: 1,
        rank: 0,
        step: 7,
        location: location.clone(),
        epoch: 0,
        step_in_epoch: 7,
        best: false,
    };
    assert!(w.report_checkpoint(ck).await.unwrap().into_inner().committed);
    c.child.kill().unwrap();
    c.wait_exit(Duration::from_secs(5)).await;
    assert!(dir.state_file().exists());

    let c2 = dir.start(1, &[]);
    let status =
        admin_client(&c2, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap().into_inner();
    assert_eq!((status.generation, status.state.as_str(), status.step), (1, "waiting", 7));
    assert_eq!(status.last_checkpoint, location);
    let mut w = worker_client(&c2, Some(WORKER_TOKEN)).await;
    let r = w.heartbeat(beat("w", &j, 8)).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Rejoin]);
    let j2 = join(&mut w, "w", 7000).await;
    let resume = j2.resume.unwrap();
    assert_eq!((j2.generation, resume.step, resume.epoch, resume.step_in_epoch), (2, 7, 0, 7));
    assert_eq!(resume.checkpoint, location);
    let list = admin_client(&c2, Some(ADMIN_TOKEN)).await.list_checkpoints(ListCheckpointsRequest {}).await.unwrap();
    assert_eq!(list.into_inner().checkpoints.len(), 1);
}

#[tokio::test]
async fn the_coordinator_exits_after_stop_once_the_workers_left() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    // The world of one is full: another worker is told once that it waits as a spare.
    let spare = Outcome::Spare(JoinSpare { generation: 1, world_size: 1 });
    assert_eq!(join_outcome(&mut w, "spare", 7001).await, spare);
    let state = admin_client(&c, Some(ADMIN_TOKEN)).await.stop(ControlRequest {}).await.unwrap().into_inner().state;
    assert_eq!(state, "stopping");
    let r = w.heartbeat(beat("w", &j, 3)).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Stop]);
    // A worker (re)starting now learns that there is nothing to join: it exits successfully.
    assert_eq!(join_outcome(&mut w, "late", 7002).await, ended("stopping"));
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    assert!(c.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_coordinator_told_to_stay_serves_status_after_the_end() {
    let dir = JobDir::new();
    let c = dir.start(1, &["coordinator.exit_when_finished=false".into()]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    w.heartbeat(HeartbeatRequest { done: true, ..beat("w", &j, 25) }).await.unwrap();
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = admin_client(&c, Some(ADMIN_TOKEN)).await.get_status(GetStatusRequest::default()).await.unwrap();
    assert_eq!(status.into_inner().state, "finished");
    assert_eq!(join_outcome(&mut w, "w", 7000).await, ended("finished"));
}

#[tokio::test]
async fn the_coordinator_exits_once_the_job_is_finished() {
    let dir = JobDir::new();
    let mut c = dir.start(1, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    let j = join(&mut w, "w", 7000).await;
    let r = w.heartbeat(HeartbeatRequest { done: true, ..beat("w", &j, 25) }).await.unwrap().into_inner();
    assert_eq!(commands(&r), vec![Cmd::Stop]);
    w.leave(LeaveRequest { worker_id: "w".into(), generation: j.generation }).await.unwrap();
    // This runtime now stays blocked, so the client never answers the server's GOAWAY: the
    // coordinator must still exit, after its shutdown grace.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = c.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the coordinator did not exit:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(c.log().contains("exiting anyway"), "{}", c.log());
}

#[tokio::test]
async fn sigterm_ends_long_polls_and_exits_cleanly() {
    let dir = JobDir::new();
    let mut c = dir.start(2, &[]);
    let mut w = worker_client(&c, Some(WORKER_TOKEN)).await;
    // Alone in a world of two: the Join long-polls until the signal.
    let pending = tokio::spawn(async move { w.join(join_request("w", 7000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = Command::new("kill").args(["-TERM", &c.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(c.wait_exit(Duration::from_secs(10)).await.success());
}
