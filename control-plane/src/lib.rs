//! cloudmap-xds: an xDS control plane that serves AWS Cloud Map services to
//! proxyless gRPC clients and Envoy, preferring same-zone endpoints.
//!
//! Data flows one way: [`cloudmap`] (AWS I/O) → [`translate`] → [`model`]
//! (plain types) → [`policy`] (pure zone shares) → [`resources`] (pure xDS
//! builders) → [`builder`] (the only writer: turns Cloud Map updates and
//! [`census`] moves into the next snapshot) → [`cache`] (encoded once,
//! versioned; [`wakeup`] says who to tell) → [`server`] (the ADS protocol
//! state machine). [`admin`] reads the cache and the watchers' [`status`];
//! `main` only wires.
//! [`peers`] sums the census with the other replicas'; [`connection_age`] ends
//! old connections so clients spread over the replicas.

pub mod admin;
pub mod authz;
pub mod aws_error;
pub mod budget;
pub mod builder;
pub mod cache;
pub mod census;
pub mod check;
pub mod cloudmap;
pub mod config;
pub mod connection_age;
pub mod model;
pub mod peers;
pub mod policy;
pub mod resources;
pub mod server;
pub mod status;
pub mod tls;
pub mod translate;
pub mod ui;
pub mod wakeup;
