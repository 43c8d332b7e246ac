//! Generated code of `proto/albef/v1`: the worker protocol (`Coordinator` service) and the
//! control protocol (`Control` service), clients and servers.

pub mod v1 {
    tonic::include_proto!("albef.v1");

    /// The encoded file descriptor set of every albef proto, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("albef_descriptor");
}
