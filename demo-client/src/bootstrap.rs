//! The gRPC xDS bootstrap (gRPC proposal A27) and the `xds:` target.
//!
//! The bootstrap is read from the file named by `GRPC_XDS_BOOTSTRAP` or, when
//! that is unset, from the JSON text in `GRPC_XDS_BOOTSTRAP_CONFIG` (the same
//! precedence gRPC uses). Only what this client needs is kept: the first xDS
//! server and the `node` (id, cluster, locality). The server's `server_uri`
//! gets `http://` when it has no scheme (or in place of gRPC's `dns:///`);
//! its `channel_creds` must offer `insecure`. The client's own zone is
//! `node.locality.zone`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Environment variable naming a bootstrap file.
pub const BOOTSTRAP_PATH_ENV: &str = "GRPC_XDS_BOOTSTRAP";
/// Environment variable holding the bootstrap JSON itself.
pub const BOOTSTRAP_CONFIG_ENV: &str = "GRPC_XDS_BOOTSTRAP_CONFIG";

/// The parts of an A27 bootstrap this client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// URI of the xDS server, always with a scheme (`http://127.0.0.1:18000`).
    pub server_uri: String,
    /// `server_features` of that server (informational).
    pub server_features: Vec<String>,
    /// Who this client says it is.
    pub node: NodeInfo,
}

/// The bootstrap's `node`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

#[derive(Debug, Deserialize)]
struct RawBootstrap {
    #[serde(default)]
    xds_servers: Vec<RawServer>,
    #[serde(default)]
    node: Option<RawNode>,
}

#[derive(Debug, Deserialize)]
struct RawServer {
    #[serde(default)]
    server_uri: String,
    #[serde(default)]
    channel_creds: Vec<RawCreds>,
    #[serde(default)]
    server_features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawCreds {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Default, Deserialize)]
struct RawNode {
    #[serde(default)]
    id: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    locality: Option<RawLocality>,
}

#[derive(Debug, Default, Deserialize)]
struct RawLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    sub_zone: String,
}

impl Bootstrap {
    /// Reads the bootstrap from the environment (see the module docs).
    pub fn from_env() -> Result<Bootstrap> {
        let path = std::env::var_os(BOOTSTRAP_PATH_ENV).filter(|p| !p.is_empty());
        let config = std::env::var(BOOTSTRAP_CONFIG_ENV).ok().filter(|c| !c.trim().is_empty());
        Bootstrap::load(path.as_deref().map(Path::new), config.as_deref())
    }

    /// Loads from a file path (preferred) or from inline JSON text.
    pub fn load(path: Option<&Path>, config: Option<&str>) -> Result<Bootstrap> {
        match (path, config) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("reading the xDS bootstrap file {} (from ${BOOTSTRAP_PATH_ENV})", path.display())
                })?;
                Bootstrap::parse(&text)
                    .with_context(|| format!("invalid xDS bootstrap in {} (${BOOTSTRAP_PATH_ENV})", path.display()))
            }
            (None, Some(text)) => {
                Bootstrap::parse(text).with_context(|| format!("invalid xDS bootstrap in ${BOOTSTRAP_CONFIG_ENV}"))
            }
            (None, None) => bail!(
                "no xDS bootstrap: set {BOOTSTRAP_PATH_ENV} to a bootstrap file or \
                 {BOOTSTRAP_CONFIG_ENV} to its JSON text"
            ),
        }
    }

    /// Parses bootstrap JSON text.
    pub fn parse(text: &str) -> Result<Bootstrap> {
        let raw: RawBootstrap =
            serde_json::from_str(text).context("the bootstrap is not valid JSON of the A27 shape")?;
        let Some(server) = raw.xds_servers.into_iter().next() else {
            bail!("\"xds_servers\" is missing or empty");
        };
        let uri = server.server_uri.trim();
        if uri.is_empty() {
            bail!("\"xds_servers[0].server_uri\" is missing or empty");
        }
        if !server.channel_creds.is_empty() && !server.channel_creds.iter().any(|c| c.kind == "insecure") {
            let offered: Vec<&str> = server.channel_creds.iter().map(|c| c.kind.as_str()).collect();
            bail!(
                "\"xds_servers[0].channel_creds\" offers {offered:?}; demo-client supports only \
                 \"insecure\""
            );
        }
        let server_uri = if let Some(rest) = uri.strip_prefix("dns:///") {
            format!("http://{rest}")
        } else if uri.contains("://") {
            uri.to_string()
        } else {
            format!("http://{uri}")
        };
        let node = raw.node.unwrap_or_default();
        let locality = node.locality.unwrap_or_default();
        Ok(Bootstrap {
            server_uri,
            server_features: server.server_features,
            node: NodeInfo {
                id: node.id,
                cluster: node.cluster,
                region: locality.region,
                zone: locality.zone,
                sub_zone: locality.sub_zone,
            },
        })
    }
}

/// The listener name for an `xds:` target: `xds:///echo.demo` → `echo.demo`
/// (the port, if any, is part of the name). Only the empty authority is
/// supported (no xDS federation).
pub fn listener_name(target: &str) -> Result<String> {
    let Some(rest) = target.strip_prefix("xds:") else {
        bail!("target {target:?} is not an xds: target (expected xds:///NAME)");
    };
    let name = if let Some(after) = rest.strip_prefix("//") {
        let Some((authority, path)) = after.split_once('/') else {
            bail!("target {target:?} has no service name (expected xds:///NAME)");
        };
        if !authority.is_empty() {
            bail!(
                "target {target:?} names the xDS authority {authority:?}; only xds:///NAME is \
                 supported"
            );
        }
        path
    } else {
        rest.trim_start_matches('/')
    };
    if name.is_empty() {
        bail!("target {target:?} has no service name (expected xds:///NAME)");
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"xds_servers":[{"server_uri":"127.0.0.1:18000",
        "channel_creds":[{"type":"insecure"}],"server_features":["xds_v3"]}],
        "node":{"id":"client-1","cluster":"demo",
                "locality":{"region":"us-east-1","zone":"us-east-1a"}}}"#;

    #[test]
    fn parses_the_a27_example() {
        let b = Bootstrap::parse(FULL).unwrap();
        assert_eq!(b.server_uri, "http://127.0.0.1:18000");
        assert_eq!(b.server_features, vec!["xds_v3".to_string()]);
        assert_eq!(b.node.id, "client-1");
        assert_eq!(b.node.cluster, "demo");
        assert_eq!(b.node.region, "us-east-1");
        assert_eq!(b.node.zone, "us-east-1a");
    }

    #[test]
    fn keeps_an_explicit_scheme() {
        let b = Bootstrap::parse(r#"{"xds_servers":[{"server_uri":"http://cp:18000"}]}"#).unwrap();
        assert_eq!(b.server_uri, "http://cp:18000");
        let b = Bootstrap::parse(r#"{"xds_servers":[{"server_uri":"dns:///cp.internal:18000"}]}"#).unwrap();
        assert_eq!(b.server_uri, "http://cp.internal:18000");
        assert_eq!(b.node, NodeInfo::default());
    }

    #[test]
    fn insecure_may_follow_other_creds() {
        let b = Bootstrap::parse(
            r#"{"xds_servers":[{"server_uri":"x:1",
                "channel_creds":[{"type":"google_default"},{"type":"insecure"}]}]}"#,
        )
        .unwrap();
        assert_eq!(b.server_uri, "http://x:1");
    }

    #[test]
    fn rejects_malformed_bootstraps() {
        for (text, needle) in [
            ("not json", "not valid JSON"),
            ("{}", "xds_servers"),
            (r#"{"xds_servers":[]}"#, "xds_servers"),
            (r#"{"xds_servers":[{"server_uri":""}]}"#, "server_uri"),
            (r#"{"xds_servers":[{"channel_creds":[]}]}"#, "server_uri"),
            (r#"{"xds_servers":[{"server_uri":"a:1","channel_creds":[{"type":"tls"}]}]}"#, "insecure"),
            (r#"{"xds_servers":"nope"}"#, "not valid JSON"),
        ] {
            let err = Bootstrap::parse(text).unwrap_err();
            let chain = format!("{err:#}");
            assert!(chain.contains(needle), "{text}: {chain}");
        }
    }

    #[test]
    fn load_prefers_the_file_and_explains_missing_ones() {
        let err = Bootstrap::load(None, None).unwrap_err();
        assert!(err.to_string().contains(BOOTSTRAP_PATH_ENV), "{err}");

        let missing = Path::new("/nonexistent/bootstrap.json");
        let err = Bootstrap::load(Some(missing), Some(FULL)).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/bootstrap.json"), "{err:#}");

        let dir = std::env::temp_dir().join(format!("demo-client-bootstrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bootstrap.json");
        std::fs::write(&file, FULL).unwrap();
        let b = Bootstrap::load(Some(&file), Some("garbage")).unwrap();
        assert_eq!(b.node.zone, "us-east-1a");
        std::fs::write(&file, "{").unwrap();
        let err = Bootstrap::load(Some(&file), None).unwrap_err();
        assert!(format!("{err:#}").contains("invalid xDS bootstrap"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();

        let b = Bootstrap::load(None, Some(FULL)).unwrap();
        assert_eq!(b.node.id, "client-1");
        let err = Bootstrap::load(None, Some("[]")).unwrap_err();
        assert!(format!("{err:#}").contains(BOOTSTRAP_CONFIG_ENV), "{err:#}");
    }

    #[test]
    fn target_to_listener_name() {
        assert_eq!(listener_name("xds:///echo.demo").unwrap(), "echo.demo");
        assert_eq!(listener_name("xds:///echo.demo:50051").unwrap(), "echo.demo:50051");
        assert_eq!(listener_name("xds:echo.demo").unwrap(), "echo.demo");
        for bad in ["echo.demo", "dns:///echo.demo", "xds:///", "xds://auth/echo.demo", "xds://x"] {
            assert!(listener_name(bad).is_err(), "{bad}");
        }
    }
}
