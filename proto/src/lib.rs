//! The `demo.v1` protocol: `Describer/Describe` answers with the instance and
//! zone that served the call. `demo-server` implements it, `demo-client` and the
//! integration tests call it; the `.proto` in `proto/` is the contract.
pub mod v1 {
    tonic::include_proto!("demo.v1");
}
