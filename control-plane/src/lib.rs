//! cloudmap-xds: an xDS control plane that serves AWS Cloud Map services to
//! proxyless gRPC clients and Envoy, preferring same-zone endpoints.
//!
//! Data flows one way: [`cloudmap`] (AWS I/O) → [`translate`] → [`model`]
//! (plain types) → [`policy`] (pure zone shares) → [`resources`] (pure xDS
//! builders) → [`cache`] (encoded once, versioned; [`wakeup`] says who to tell)
//! → [`server`] (the ADS protocol state machine). [`admin`] reads the cache; `main` only wires.

pub mod admin;
pub mod authz;
pub mod aws_error;
pub mod bootstrap;
pub mod budget;
pub mod cache;
pub mod census;
pub mod cloudmap;
pub mod config;
pub mod model;
pub mod policy;
pub mod resources;
pub mod server;
pub mod tls;
pub mod translate;
pub mod wakeup;
