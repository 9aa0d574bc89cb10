//! What the Cloud Map side knows about itself, for the operator: how far each
//! namespace got, when each service last synced, which instances a read
//! skipped and why a service's routing attributes were refused. Written by the
//! watchers (and by the [`crate::builder`] for what follows a claim), read by
//! `/ready`, `/config_dump` and the operator page. Nothing here is served to
//! clients, so it is kept apart from the index they read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::translate::Skipped;

/// How far a namespace named on the command line got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum NamespaceState {
    /// Not listed yet, or its first services not read yet.
    Pending,
    /// Listed, and every service in it read once.
    Synced,
    /// Cloud Map has no namespace of this name (a successful ListNamespaces said so).
    Missing,
    /// The last attempt failed; the text says why.
    Error(String),
}

/// The sync status of every namespace and service (by dial name).
#[derive(Debug, Default)]
pub struct Status {
    namespaces: Mutex<BTreeMap<String, NamespaceState>>,
    synced: DashMap<String, Instant>,
    /// Why a service's routing from its Cloud Map attributes was refused (last good kept).
    routing_errors: DashMap<String, String>,
    /// The instances of each service that the last Cloud Map read skipped, and why.
    skipped: DashMap<String, Vec<Skipped>>,
}

impl Status {
    pub fn set_namespace_state(&self, namespace: &str, state: NamespaceState) {
        let missing = f64::from(u8::from(state == NamespaceState::Missing));
        metrics::gauge!("cloudmap_xds_namespace_missing", "namespace" => namespace.to_string()).set(missing);
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).insert(namespace.to_string(), state);
    }

    /// Each namespace named on the command line and how far it got.
    pub fn namespace_states(&self) -> BTreeMap<String, NamespaceState> {
        self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A Cloud Map call for service `dial` just succeeded.
    pub fn mark_synced(&self, dial: &str) {
        self.synced.insert(dial.to_string(), Instant::now());
    }

    /// Time since each service's last successful Cloud Map call.
    pub fn sync_ages(&self) -> BTreeMap<String, Duration> {
        self.synced.iter().map(|e| (e.key().clone(), e.value().elapsed())).collect()
    }

    /// Record (or clear) why service `dial`'s routing attributes were refused.
    pub fn set_routing_error(&self, dial: &str, error: Option<String>) {
        match error {
            Some(error) => self.routing_errors.insert(dial.to_string(), error),
            None => self.routing_errors.remove(dial).map(|(_, e)| e),
        };
    }

    /// Why service `dial`'s routing attributes were refused, while they are.
    pub fn routing_error(&self, dial: &str) -> Option<String> {
        self.routing_errors.get(dial).map(|e| e.clone())
    }

    /// Record the instances of service `dial` that its last Cloud Map read skipped.
    pub fn set_skipped(&self, dial: &str, skipped: Vec<Skipped>) {
        if skipped.is_empty() {
            self.skipped.remove(dial);
        } else {
            self.skipped.insert(dial.to_string(), skipped);
        }
    }

    /// The instances of service `dial` skipped at its last read, with the reason.
    pub fn skipped(&self, dial: &str) -> Vec<Skipped> {
        self.skipped.get(dial).map(|s| s.clone()).unwrap_or_default()
    }

    /// Service `dial` is no longer served: forget its sync time and skips.
    pub fn forget(&self, dial: &str) {
        self.synced.remove(dial);
        self.skipped.remove(dial);
    }
}
