//! Generated tonic/prost code of `proto/albef/v1` (compiled with protoc at build time), nothing
//! else: the worker protocol (`Coordinator` service: Join, PublishNcclId, GetNcclId, GetLeases,
//! Heartbeat, ReportCheckpoint, RejectCheckpoint, ReportEvaluation, Leave) and the control protocol
//! (`Control` service, for `albefctl`: GetStatus, WatchStatus, Pause, Resume, Stop, Checkpoint,
//! ListCheckpoints), clients and servers under `v1`, and `v1::FILE_DESCRIPTOR_SET` for gRPC server
//! reflection.

pub mod v1 {
    tonic::include_proto!("albef.v1");

    /// The encoded file descriptor set of every albef proto, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("albef_descriptor");
}
