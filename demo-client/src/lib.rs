//! `demo-client`: a Rust xDS client for the cloudmap-xds demo.
//!
//! It reads a gRPC A27 bootstrap ([`bootstrap`]), speaks ADS to the control
//! plane ([`xds`]) to learn the endpoints of an `xds:///NAME` target with
//! their localities, weights and priorities, picks endpoints the way gRPC's
//! `priority` / `weighted_target` / `round_robin` policies do ([`picker`]),
//! and calls `demo.v1.Describer/Describe` on them ([`balancer`]). The
//! subcommands are an HTTP front ([`http`]) and a load generator ([`load`]);
//! [`cli`] ties them together.

pub mod balancer;
pub mod bootstrap;
pub mod cli;
pub mod http;
pub mod load;
pub mod picker;
pub mod xds;
