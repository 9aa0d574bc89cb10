//! Who may read what, for clients that authenticate with a certificate
//! (mTLS). `[authz]` in the TOML file lists rules: a client certificate
//! identity pattern (a SAN URI such as a SPIFFE ID, or a SAN DNS name; `*`
//! matches any run of characters) and the namespaces and services
//! (`SERVICE.NAMESPACE`) its clients may read. A client's [`Access`] is the
//! union of the rules any of its identities match; it reads nothing else:
//! LDS and CDS whole sets leave out what it may not read, and a name it may
//! not read is answered as absent (as a service that does not exist). Each
//! refusal counts in `cloudmap_xds_authz_denied_total`, and the first one of
//! each identity and name is logged.
//!
//! Without `[authz]` every client reads everything (the default). The
//! decisions are pure; the cache asks them in `Snapshot::resolve`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::model::ServiceName;

/// `[authz]`: the rules, checked in order; a client gets what any rule matching it allows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzTable {
    #[serde(default)]
    pub allow: Vec<AllowRule>,
}

/// `[[authz.allow]]`: clients whose certificate names `identity` may read these.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// A SAN URI (`spiffe://corp/ns/orders/sa/web`) or DNS name pattern; `*` matches any run.
    pub identity: String,
    /// Namespaces every service of which may be read; `"*"`: all (and Envoy's egress routes).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Services (`SERVICE.NAMESPACE`) that may be read.
    #[serde(default)]
    pub services: Vec<String>,
    /// May ask CSDS on the xDS port (`--csds-on-xds-port`): it shows every client.
    #[serde(default)]
    pub csds: bool,
}

/// Most (identity, name) refusals remembered so each is logged once; beyond, refusals are only counted.
const LOGGED_MAX: usize = 10_000;

/// The rules in force, and which refusals were logged.
#[derive(Debug)]
pub struct Authz {
    rules: Vec<AllowRule>,
    logged: Mutex<BTreeSet<(String, String)>>,
}

impl Authz {
    pub fn new(table: &AuthzTable) -> anyhow::Result<Arc<Authz>> {
        for (i, rule) in table.allow.iter().enumerate() {
            anyhow::ensure!(
                !rule.identity.trim().is_empty(),
                "[[authz.allow]] rule {}: identity is empty (give a SAN URI or DNS name pattern)",
                i + 1
            );
            anyhow::ensure!(
                !(rule.namespaces.is_empty() && rule.services.is_empty() && !rule.csds),
                "[[authz.allow]] rule {} ({}): names no namespaces and no services",
                i + 1,
                rule.identity
            );
        }
        Ok(Arc::new(Authz { rules: table.allow.clone(), logged: Mutex::new(BTreeSet::new()) }))
    }

    /// Whether a client with these identities may ask CSDS on the xDS port.
    pub fn allows_csds(&self, identities: &[String]) -> bool {
        self.rules.iter().any(|r| r.csds && identities.iter().any(|id| glob(&r.identity, id)))
    }

    /// What a client with these certificate identities may read.
    pub fn access(self: &Arc<Self>, identities: &[String]) -> Access {
        let mut all = false;
        let mut namespaces = BTreeSet::new();
        let mut services = BTreeSet::new();
        for rule in self.rules.iter().filter(|r| identities.iter().any(|id| glob(&r.identity, id))) {
            all |= rule.namespaces.iter().any(|n| n == "*");
            namespaces.extend(rule.namespaces.iter().cloned());
            services.extend(rule.services.iter().cloned());
        }
        let identity = if identities.is_empty() { "(no identity)".to_string() } else { identities.join(",") };
        Access { identity, all, namespaces, services, authz: self.clone() }
    }
}

/// What one client may read (see the module doc).
#[derive(Debug, Clone)]
pub struct Access {
    /// The client's identities, for logs.
    pub identity: String,
    all: bool,
    namespaces: BTreeSet<String>,
    services: BTreeSet<String>,
    authz: Arc<Authz>,
}

impl PartialEq for Access {
    fn eq(&self, other: &Self) -> bool {
        self.identity == other.identity
    }
}

impl Eq for Access {}

impl std::hash::Hash for Access {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity.hash(state);
    }
}

impl Access {
    /// Whether every service may be read (and so Envoy's egress routes, which name them all).
    pub fn reads_all(&self) -> bool {
        self.all
    }

    pub fn allows(&self, service: &ServiceName) -> bool {
        self.all || self.namespaces.contains(&service.namespace) || self.services.contains(&service.dial_name())
    }

    /// Count a refused name, and log it the first time for this identity.
    pub fn denied(&self, name: &str) {
        metrics::counter!("cloudmap_xds_authz_denied_total").increment(1);
        let mut logged = self.authz.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() < LOGGED_MAX && logged.insert((self.identity.clone(), name.to_string())) {
            drop(logged);
            let name: String = name.chars().take(200).collect();
            tracing::warn!(identity = %self.identity, %name, "not authorized: answered as absent ([authz])");
        }
    }
}

/// `*` matches any run of characters (none included); everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// The identities a client certificate (DER) names: its SAN URIs and DNS names.
pub fn identities(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs() {
        for (pattern, text, want) in [
            ("spiffe://corp/ns/orders/*", "spiffe://corp/ns/orders/sa/web", true),
            ("spiffe://corp/ns/orders/*", "spiffe://corp/ns/payments/sa/web", false),
            ("*.orders.internal", "web.orders.internal", true),
            ("*.orders.internal", "orders.internal", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "acb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob(pattern, text), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn access_is_the_union_of_matching_rules() {
        let table = AuthzTable {
            allow: vec![
                AllowRule {
                    identity: "spiffe://t/orders/*".into(),
                    services: vec!["echo.demo".into()],
                    ..Default::default()
                },
                AllowRule { identity: "*.ops.internal".into(), namespaces: vec!["*".into()], ..Default::default() },
                AllowRule {
                    identity: "spiffe://t/orders/web".into(),
                    namespaces: vec!["pay".into()],
                    ..Default::default()
                },
            ],
        };
        let authz = Authz::new(&table).expect("valid");
        let web = authz.access(&["spiffe://t/orders/web".into()]);
        assert!(web.allows(&ServiceName::new("demo", "echo")) && !web.allows(&ServiceName::new("demo", "other")));
        assert!(web.allows(&ServiceName::new("pay", "anything")) && !web.reads_all());
        let ops = authz.access(&["x".into(), "admin.ops.internal".into()]);
        assert!(ops.reads_all() && ops.allows(&ServiceName::new("any", "thing")));
        let nobody = authz.access(&[]);
        assert!(!nobody.allows(&ServiceName::new("demo", "echo")));
        assert!(!authz.allows_csds(&["spiffe://t/orders/web".into()]));
        let csds = AllowRule { identity: "*.ops.internal".into(), csds: true, ..Default::default() };
        let with_csds = Authz::new(&AuthzTable { allow: vec![csds] }).expect("valid");
        assert!(with_csds.allows_csds(&["admin.ops.internal".into()]) && !with_csds.allows_csds(&[]));
        let empty = AuthzTable { allow: vec![AllowRule { identity: "x".into(), ..Default::default() }] };
        assert!(Authz::new(&empty).expect_err("no grants").to_string().contains("names no namespaces"));
    }
}
