//! `cloudmap-xds bootstrap`: writes the gRPC xDS bootstrap file (gRPC
//! proposal A27) that points a proxyless gRPC client (Go, Java, Python, Node,
//! C++ or the Rust demo-client) at this control plane:
//!
//! ```json
//! {"xds_servers": [{"server_uri": "cloudmap-xds.internal:18000",
//!                   "channel_creds": [{"type": "insecure"}],
//!                   "server_features": ["xds_v3"]}],
//!  "node": {"id": "web-1f2e3d", "cluster": "cloudmap-xds-client",
//!           "locality": {"region": "us-east-1", "zone": "us-east-1a"}}}
//! ```
//!
//! The client's zone is what makes same-zone routing work, so it is looked up
//! in this order:
//!
//! 1. `--zone` / `CLOUDMAP_XDS_BOOTSTRAP_ZONE`;
//! 2. ECS task metadata v4: `GET ${ECS_CONTAINER_METADATA_URI_V4}/task`,
//!    field `AvailabilityZone`;
//! 3. EC2 instance metadata (IMDSv2): `PUT /latest/api/token`, then
//!    `GET /latest/meta-data/placement/availability-zone` and
//!    `…/placement/region` with the token. The base URL is
//!    `AWS_EC2_METADATA_SERVICE_ENDPOINT` when set (as in the AWS SDKs; with
//!    `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6` the default is
//!    `http://[fd00:ec2::254]`), else `http://169.254.169.254`; it is skipped
//!    when `AWS_EC2_METADATA_DISABLED=true`;
//! 4. otherwise the bootstrap has no `node.locality.zone` and a warning on
//!    stderr says that same-zone routing will not apply to this client.
//!
//! The region: `--region` / `CLOUDMAP_XDS_BOOTSTRAP_REGION`; else, when the
//! zone came from `--zone`, the region that zone name belongs to
//! (`us-east-1a` → `us-east-1`); else metadata (the region field of the ECS
//! `TaskARN`, or IMDS `placement/region`, or the metadata zone's region);
//! else `AWS_REGION`, then `AWS_DEFAULT_REGION`; else it is omitted.
//!
//! Every metadata request has the `--metadata-timeout` (default 1s), so a
//! laptop without instance metadata is not held up; metadata failures are
//! never fatal.
//!
//! Channel credentials: `insecure` by default; with `--ca-file`, `tls`
//! (gRFC A65: the client verifies the control plane with that CA), and with
//! `--cert-file` and `--key-file` as well, mTLS (the client presents that
//! certificate). The files are read by the client, which re-reads them
//! every `refresh_interval`, so rotated certificates are picked up:
//!
//! ```json
//! "channel_creds": [{"type": "tls", "config": {
//!     "ca_certificate_file": "/etc/xds/ca.pem",
//!     "certificate_file": "/etc/xds/client.pem", "private_key_file": "/etc/xds/client.key",
//!     "refresh_interval": "600s"}}]
//! ```
//!
//! The pieces: [`Environment`] (what `main` reads from the process
//! environment, passed in so tests need not touch it), [`resolve`] (the
//! look-ups, done by the `placement` crate), [`build_bootstrap`] (pure JSON) and [`write_output`] (stdout or
//! an atomic temp-file-and-rename).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use placement::non_empty;
pub use placement::{Environment, ZoneSource};

/// Prefix of every line this command prints to stderr.
const PREFIX: &str = "cloudmap-xds bootstrap";

/// Flags of `cloudmap-xds bootstrap`. Each one can also be set by an
/// environment variable `CLOUDMAP_XDS_BOOTSTRAP_<FLAG>`.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// The control plane's xDS address as the client dials it, HOST:PORT
    /// (e.g. cloudmap-xds.internal:18000), or a gRPC target such as
    /// dns:///HOST:PORT.
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_SERVER_URI", value_parser = parse_server_uri)]
    pub server_uri: String,

    /// The client's xDS node id [default: the ECS task id, else the host
    /// name, followed by "-" and 6 random hex digits].
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_NODE_ID")]
    pub node_id: Option<String>,

    /// The client's xDS node cluster.
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_CLUSTER", default_value = "cloudmap-xds-client")]
    pub cluster: String,

    /// The client's availability zone [default: from ECS task metadata, else
    /// EC2 instance metadata, else omitted (no same-zone routing)].
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_ZONE")]
    pub zone: Option<String>,

    /// The client's region [default: the region of --zone, else from
    /// metadata, else $AWS_REGION / $AWS_DEFAULT_REGION, else omitted].
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_REGION")]
    pub region: Option<String>,

    /// Where to write the bootstrap: a file path (replaced atomically) or
    /// "-" for stdout. Clients read it from $GRPC_XDS_BOOTSTRAP.
    #[arg(long, short = 'o', env = "CLOUDMAP_XDS_BOOTSTRAP_OUTPUT", default_value = "-")]
    pub output: PathBuf,

    /// Timeout of each ECS / EC2 metadata request (e.g. 500ms, 1s).
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_METADATA_TIMEOUT", default_value = "1s", value_parser = parse_timeout)]
    pub metadata_timeout: Duration,

    /// Reach the control plane over TLS, verifying it with this PEM CA file (as
    /// the client sees the path; absolute paths are safest) [default: insecure].
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// mTLS: the client's PEM certificate chain (needs --ca-file and --key-file).
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_CERT_FILE", requires_all = ["ca_file", "key_file"])]
    pub cert_file: Option<PathBuf>,

    /// mTLS: the PEM private key of --cert-file.
    #[arg(long, env = "CLOUDMAP_XDS_BOOTSTRAP_KEY_FILE", requires_all = ["ca_file", "cert_file"])]
    pub key_file: Option<PathBuf>,
}

/// The TLS channel credentials a bootstrap names (gRFC A65).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCreds {
    pub ca_file: PathBuf,
    /// The client certificate and key, for mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsCreds {
    fn from_args(args: &BootstrapArgs) -> Option<TlsCreds> {
        let ca_file = args.ca_file.clone()?;
        let identity = args.cert_file.clone().zip(args.key_file.clone());
        Some(TlsCreds { ca_file, identity })
    }

    fn json(&self) -> Value {
        let mut config = json!({
            "ca_certificate_file": self.ca_file.display().to_string(),
            "refresh_interval": "600s",
        });
        if let Some((cert, key)) = &self.identity {
            config["certificate_file"] = Value::String(cert.display().to_string());
            config["private_key_file"] = Value::String(key.display().to_string());
        }
        json!({"type": "tls", "config": config})
    }
}

/// A metadata timeout: `500ms`, `1s`, `1.5s` or plain seconds.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("{text:?} is not a positive timeout (try 500ms or 1s)")),
    }
}

/// Accepts `HOST:PORT` (`[v6]:PORT` for IPv6 literals) or a gRPC target with
/// a scheme gRPC resolves itself (`dns:`, `ipv4:`, `ipv6:`, `unix:`,
/// `unix-abstract:`, `xds:`).
pub fn parse_server_uri(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the server URI is empty (give HOST:PORT, e.g. cloudmap-xds.internal:18000)".into());
    }
    for scheme in ["http://", "https://", "grpc://"] {
        if let Some(rest) = text.strip_prefix(scheme) {
            return Err(format!(
                "{text:?}: gRPC targets have no {scheme} scheme; give HOST:PORT, e.g. {}",
                rest.trim_end_matches('/')
            ));
        }
    }
    const SCHEMES: [&str; 6] = ["dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:"];
    if SCHEMES.iter().any(|s| text.starts_with(s)) {
        return Ok(text.to_owned());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port; give HOST:PORT, e.g. {text}:18000"));
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|v6| !v6.is_empty())
    } else {
        !host.is_empty() && !host.contains(':') && !host.contains('/')
    };
    if !host_ok {
        return Err(format!("{text:?}: bad host; give HOST:PORT (write IPv6 addresses as [ADDR]:PORT)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(text.to_owned()),
        _ => Err(format!("{text:?}: {port:?} is not a port (1-65535); give HOST:PORT")),
    }
}

/// Everything the bootstrap document is built from, already resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapInputs {
    pub server_uri: String,
    pub node_id: String,
    pub cluster: String,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// TLS channel credentials; `None`: insecure.
    pub tls: Option<TlsCreds>,
}

/// The outcome of [`resolve`]: the inputs, and warnings for stderr.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub inputs: BootstrapInputs,
    pub zone_source: ZoneSource,
    pub warnings: Vec<String>,
}

/// The pure part: the A27 bootstrap document. `locality` carries only the
/// fields that are known and is left out when neither is.
pub fn build_bootstrap(inputs: &BootstrapInputs) -> Value {
    let mut node = json!({
        "id": inputs.node_id,
        "cluster": inputs.cluster,
    });
    let mut locality = serde_json::Map::new();
    if let Some(region) = &inputs.region {
        locality.insert("region".into(), Value::String(region.clone()));
    }
    if let Some(zone) = &inputs.zone {
        locality.insert("zone".into(), Value::String(zone.clone()));
    }
    if !locality.is_empty() {
        node["locality"] = Value::Object(locality);
    }
    // Only the TLS entry when asked for: a client falls back along the list, and an
    // insecure fallback would undo TLS.
    let creds = match &inputs.tls {
        Some(tls) => tls.json(),
        None => json!({"type": "insecure"}),
    };
    json!({
        "xds_servers": [{
            "server_uri": inputs.server_uri,
            "channel_creds": [creds],
            "server_features": ["xds_v3"],
        }],
        "node": node,
    })
}

/// Works out node id, zone and region from the flags, then (only for what is
/// still missing) ECS task metadata, EC2 instance metadata and the
/// environment. Metadata failures become warnings, never errors.
pub async fn resolve(args: &BootstrapArgs, env: &Environment) -> anyhow::Result<Resolution> {
    let mut warnings = Vec::new();
    let node_id_flag = non_empty(args.node_id.clone());
    let location = placement::locate(env, args.zone.clone(), args.region.clone(), node_id_flag.is_none()).await?;
    if let Some(e) = &location.ecs_error {
        warnings.push(format!(
            "cannot read ECS task metadata ({e}); trying EC2 instance metadata. \
             Pass --zone to skip the look-up."
        ));
    }
    if location.zone.is_none() {
        let ecs = if env.ecs_metadata_uri.is_some() {
            "the ECS task metadata has no AvailabilityZone"
        } else {
            "not on ECS (ECS_CONTAINER_METADATA_URI_V4 is unset)"
        };
        let imds = location.imds_error.clone().unwrap_or_else(|| "no answer".to_owned());
        warnings.push(format!(
            "cannot find this client's availability zone: no --zone \
             (CLOUDMAP_XDS_BOOTSTRAP_ZONE), {ecs}, EC2 instance metadata: {imds}. \
             The bootstrap has no node.locality.zone, so same-zone routing will not \
             apply to this client: cloudmap-xds will spread its calls over all zones. \
             Pass --zone ZONE (e.g. --zone us-east-1a) to fix this."
        ));
    }
    let node_id = node_id_flag.unwrap_or_else(|| {
        let prefix = location
            .ecs_task_id
            .clone()
            .or_else(|| env.hostname.clone())
            .unwrap_or_else(|| "cloudmap-xds-client".to_owned());
        format!("{prefix}-{:06x}", rand::random::<u32>() & 0x00ff_ffff)
    });
    Ok(Resolution {
        inputs: BootstrapInputs {
            server_uri: args.server_uri.clone(),
            node_id,
            cluster: args.cluster.clone(),
            zone: location.zone,
            region: location.region,
            tls: TlsCreds::from_args(args),
        },
        zone_source: location.zone_source,
        warnings,
    })
}

/// Writes `text` to stdout (`-`) or atomically to `path`: a temp file in the
/// same directory, flushed to disk, then renamed over the target.
pub fn write_output(path: &Path, text: &str) -> anyhow::Result<()> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes()).and_then(|()| out.flush()).context("writing the bootstrap to stdout")?;
        return Ok(());
    }
    let Some(name) = path.file_name() else {
        bail!(
            "--output {} is not a file path (give e.g. /etc/grpc/xds-bootstrap.json, or - for stdout)",
            path.display()
        );
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp =
        dir.join(format!(".{}.{}.{:08x}.tmp", name.to_string_lossy(), std::process::id(), rand::random::<u32>()));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| {
            format!(
                "writing the bootstrap to {} (check that {} exists and is writable, or use --output -)",
                path.display(),
                dir.display()
            )
        });
    }
    Ok(())
}

/// The `bootstrap` subcommand: resolve, build, write; warnings and a summary
/// go to stderr.
pub async fn run(args: BootstrapArgs) -> anyhow::Result<()> {
    let env = Environment::from_process_env(args.metadata_timeout);
    let resolution = resolve(&args, &env).await?;
    for warning in &resolution.warnings {
        eprintln!("{PREFIX}: warning: {warning}");
    }
    let document = build_bootstrap(&resolution.inputs);
    let mut text = serde_json::to_string_pretty(&document).context("encoding the bootstrap JSON")?;
    text.push('\n');
    write_output(&args.output, &text)?;
    let inputs = &resolution.inputs;
    let target = if args.output == Path::new("-") { "stdout".to_owned() } else { args.output.display().to_string() };
    let creds = match &inputs.tls {
        None => "insecure",
        Some(TlsCreds { identity: None, .. }) => "tls",
        Some(_) => "mtls",
    };
    eprintln!(
        "{PREFIX}: wrote {target}: server {} ({creds}), node id {}, zone {} ({}), region {}",
        inputs.server_uri,
        inputs.node_id,
        inputs.zone.as_deref().unwrap_or("-"),
        match resolution.zone_source {
            ZoneSource::Given => "--zone".to_owned(),
            other => other.to_string(),
        },
        inputs.region.as_deref().unwrap_or("-"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, put};
    use clap::Parser;

    use super::*;

    const TOKEN: &str = "test-token-123";

    fn args(server_uri: &str) -> BootstrapArgs {
        BootstrapArgs {
            server_uri: server_uri.to_owned(),
            node_id: None,
            cluster: "cloudmap-xds-client".to_owned(),
            zone: None,
            region: None,
            output: PathBuf::from("-"),
            metadata_timeout: Duration::from_secs(1),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }

    /// No metadata anywhere: ECS unset, IMDS disabled, no AWS_REGION.
    fn bare_env() -> Environment {
        Environment {
            ecs_metadata_uri: None,
            imds_endpoint: None,
            metadata_timeout: Duration::from_secs(1),
            aws_region: None,
            hostname: Some("test-host".to_owned()),
        }
    }

    async fn serve(router: Router) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(addr)
    }

    /// An address nothing listens on (bound, then released).
    async fn closed_port() -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        drop(listener);
        Ok(addr)
    }

    async fn fake_ecs() -> anyhow::Result<String> {
        let router = Router::new().route(
            "/v4/abc/task",
            get(|| async {
                axum::Json(json!({
                    "AvailabilityZone": "eu-west-1b",
                    "TaskARN": "arn:aws:ecs:eu-west-1:123456789012:task/demo/abc123",
                }))
            }),
        );
        Ok(format!("http://{}/v4/abc", serve(router).await?))
    }

    /// IMDSv2 that insists on the token: PUT needs the TTL header, GETs
    /// without the token get 401.
    async fn fake_imds(zone: &'static str, region: Option<&'static str>) -> anyhow::Result<String> {
        fn authorized(headers: &HeaderMap) -> bool {
            headers.get("x-aws-ec2-metadata-token").is_some_and(|v| v == TOKEN)
        }
        let mut router = Router::new()
            .route(
                "/latest/api/token",
                put(|headers: HeaderMap| async move {
                    match headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
                        Some(ttl) if ttl == "21600" => (StatusCode::OK, TOKEN),
                        _ => (StatusCode::BAD_REQUEST, "missing ttl"),
                    }
                }),
            )
            .route(
                "/latest/meta-data/placement/availability-zone",
                get(move |headers: HeaderMap| async move {
                    if authorized(&headers) { (StatusCode::OK, zone) } else { (StatusCode::UNAUTHORIZED, "") }
                }),
            );
        if let Some(region) = region {
            router = router.route(
                "/latest/meta-data/placement/region",
                get(move |headers: HeaderMap| async move {
                    if authorized(&headers) { (StatusCode::OK, region) } else { (StatusCode::UNAUTHORIZED, "") }
                }),
            );
        }
        Ok(format!("http://{}", serve(router).await?))
    }

    fn locality(doc: &Value) -> &Value {
        &doc["node"]["locality"]
    }

    #[tokio::test]
    async fn ecs_task_metadata_gives_zone_region_and_node_id() -> anyhow::Result<()> {
        let env = Environment {
            ecs_metadata_uri: Some(fake_ecs().await?),
            // IMDS must not be needed: point it at nothing.
            imds_endpoint: Some(format!("http://{}", closed_port().await?)),
            ..bare_env()
        };
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert_eq!(r.inputs.zone.as_deref(), Some("eu-west-1b"));
        assert_eq!(r.inputs.region.as_deref(), Some("eu-west-1"));
        assert_eq!(r.zone_source, ZoneSource::EcsTaskMetadata);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let suffix = r.inputs.node_id.strip_prefix("abc123-").expect("node id starts with the task id");
        assert!(suffix.len() == 6 && suffix.chars().all(|c| c.is_ascii_hexdigit()));
        let doc = build_bootstrap(&r.inputs);
        assert_eq!(locality(&doc)["zone"], "eu-west-1b");
        assert_eq!(locality(&doc)["region"], "eu-west-1");
        Ok(())
    }

    #[tokio::test]
    async fn imdsv2_with_required_token_gives_zone_and_region() -> anyhow::Result<()> {
        let base = fake_imds("ap-south-1c", Some("ap-south-1")).await?;
        // The fake really refuses token-less reads.
        let plain =
            reqwest::Client::new().get(format!("{base}/latest/meta-data/placement/availability-zone")).send().await?;
        assert_eq!(plain.status(), reqwest::StatusCode::UNAUTHORIZED);
        let no_ttl = reqwest::Client::new().put(format!("{base}/latest/api/token")).send().await?;
        assert_eq!(no_ttl.status(), reqwest::StatusCode::BAD_REQUEST);
        let env = Environment { imds_endpoint: Some(base), aws_region: Some("us-west-2".to_owned()), ..bare_env() };
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert_eq!(r.inputs.zone.as_deref(), Some("ap-south-1c"));
        assert_eq!(r.inputs.region.as_deref(), Some("ap-south-1"));
        assert_eq!(r.zone_source, ZoneSource::Ec2InstanceMetadata);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert!(r.inputs.node_id.starts_with("test-host-"));
        Ok(())
    }

    #[tokio::test]
    async fn imds_without_region_derives_it_from_the_zone() -> anyhow::Result<()> {
        let env = Environment { imds_endpoint: Some(fake_imds("us-gov-west-1b", None).await?), ..bare_env() };
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert_eq!(r.inputs.zone.as_deref(), Some("us-gov-west-1b"));
        assert_eq!(r.inputs.region.as_deref(), Some("us-gov-west-1"));
        Ok(())
    }

    #[tokio::test]
    async fn broken_ecs_metadata_falls_back_to_imds_with_a_warning() -> anyhow::Result<()> {
        let broken = Router::new().route("/task", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }));
        let env = Environment {
            ecs_metadata_uri: Some(format!("http://{}", serve(broken).await?)),
            imds_endpoint: Some(fake_imds("us-east-1a", Some("us-east-1")).await?),
            ..bare_env()
        };
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert_eq!(r.inputs.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(r.zone_source, ZoneSource::Ec2InstanceMetadata);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("ECS task metadata"), "{:?}", r.warnings);
        Ok(())
    }

    #[tokio::test]
    async fn no_metadata_means_no_zone_but_a_valid_bootstrap() -> anyhow::Result<()> {
        let env = Environment { imds_endpoint: Some(format!("http://{}", closed_port().await?)), ..bare_env() };
        let started = std::time::Instant::now();
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(r.inputs.zone, None);
        assert_eq!(r.inputs.region, None);
        assert_eq!(r.zone_source, ZoneSource::None);
        assert!(
            r.warnings.iter().any(|w| w.contains("same-zone routing will not apply") && w.contains("--zone")),
            "{:?}",
            r.warnings
        );
        let doc = build_bootstrap(&r.inputs);
        assert_eq!(doc["xds_servers"][0]["server_uri"], "cloudmap-xds.internal:18000");
        assert!(doc["node"]["id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(doc["node"].get("locality").is_none());

        // Region still comes from AWS_REGION when metadata has none.
        let env = Environment { aws_region: Some("eu-central-1".to_owned()), ..bare_env() };
        let r = resolve(&args("cloudmap-xds.internal:18000"), &env).await?;
        assert_eq!(r.inputs.zone, None);
        assert_eq!(r.inputs.region.as_deref(), Some("eu-central-1"));
        assert!(r.warnings.iter().any(|w| w.contains("AWS_EC2_METADATA_DISABLED")));
        Ok(())
    }

    #[tokio::test]
    async fn zone_flag_overrides_all_metadata() -> anyhow::Result<()> {
        let env = Environment {
            ecs_metadata_uri: Some(fake_ecs().await?),
            imds_endpoint: Some(fake_imds("ap-south-1c", Some("ap-south-1")).await?),
            aws_region: Some("sa-east-1".to_owned()),
            ..bare_env()
        };
        let mut a = args("cloudmap-xds.internal:18000");
        a.zone = Some("us-east-1c".to_owned());
        a.node_id = Some("my-node".to_owned());
        let r = resolve(&a, &env).await?;
        assert_eq!(r.inputs.zone.as_deref(), Some("us-east-1c"));
        assert_eq!(r.inputs.region.as_deref(), Some("us-east-1"));
        assert_eq!(r.inputs.node_id, "my-node");
        assert_eq!(r.zone_source, ZoneSource::Given);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);

        // --region wins over everything too.
        a.region = Some("us-east-2".to_owned());
        let r = resolve(&a, &env).await?;
        assert_eq!(r.inputs.region.as_deref(), Some("us-east-2"));
        Ok(())
    }

    #[test]
    fn builder_writes_the_a27_shape() {
        let doc = build_bootstrap(&BootstrapInputs {
            server_uri: "cloudmap-xds.internal:18000".into(),
            node_id: "node-1".into(),
            cluster: "cloudmap-xds-client".into(),
            zone: Some("us-east-1a".into()),
            region: Some("us-east-1".into()),
            tls: None,
        });
        assert_eq!(
            doc,
            json!({
                "xds_servers": [{
                    "server_uri": "cloudmap-xds.internal:18000",
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }],
                "node": {
                    "id": "node-1",
                    "cluster": "cloudmap-xds-client",
                    "locality": {"region": "us-east-1", "zone": "us-east-1a"},
                },
            })
        );

        let doc = build_bootstrap(&BootstrapInputs {
            server_uri: "10.0.0.1:18000".into(),
            node_id: "n".into(),
            cluster: "c".into(),
            zone: None,
            region: Some("us-east-1".into()),
            tls: None,
        });
        assert_eq!(doc["node"]["locality"], json!({"region": "us-east-1"}));
    }

    #[test]
    fn builder_writes_a65_tls_and_mtls_channel_creds() {
        let inputs = |identity| BootstrapInputs {
            server_uri: "cloudmap-xds.internal:18000".into(),
            node_id: "n".into(),
            cluster: "c".into(),
            zone: None,
            region: None,
            tls: Some(TlsCreds { ca_file: "/etc/xds/ca.pem".into(), identity }),
        };
        let tls = build_bootstrap(&inputs(None));
        assert_eq!(
            tls["xds_servers"][0]["channel_creds"],
            json!([{"type": "tls", "config": {"ca_certificate_file": "/etc/xds/ca.pem", "refresh_interval": "600s"}}])
        );
        let mtls = build_bootstrap(&inputs(Some(("/etc/xds/c.pem".into(), "/etc/xds/c.key".into()))));
        assert_eq!(
            mtls["xds_servers"][0]["channel_creds"],
            json!([{"type": "tls", "config": {
                "ca_certificate_file": "/etc/xds/ca.pem",
                "certificate_file": "/etc/xds/c.pem",
                "private_key_file": "/etc/xds/c.key",
                "refresh_interval": "600s",
            }}])
        );
    }

    #[test]
    fn output_file_is_written_atomically_and_reads_back() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!(
            "cloudmap-xds-bootstrap-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("xds-bootstrap.json");
        std::fs::write(&path, "old contents")?;
        let inputs = BootstrapInputs {
            server_uri: "cloudmap-xds.internal:18000".into(),
            node_id: "node-1".into(),
            cluster: "cloudmap-xds-client".into(),
            zone: Some("eu-west-1b".into()),
            region: Some("eu-west-1".into()),
            tls: None,
        };
        let text = serde_json::to_string_pretty(&build_bootstrap(&inputs))?;
        write_output(&path, &text)?;
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        assert_eq!(back, build_bootstrap(&inputs));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)?.filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");

        let missing = dir.join("no-such-dir").join("x.json");
        let error = format!("{:#}", write_output(&missing, &text).expect_err("no dir"));
        assert!(error.contains("writable"), "{error}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn server_uris_are_checked() {
        for good in [
            "cloudmap-xds.internal:18000",
            "10.0.0.1:18000",
            "[::1]:18000",
            "dns:///cloudmap-xds.internal:18000",
            "unix:///run/xds.sock",
        ] {
            assert_eq!(parse_server_uri(good).as_deref(), Ok(good), "{good}");
        }
        for (bad, needle) in [
            ("", "empty"),
            ("cloudmap-xds.internal", "no port"),
            ("http://cloudmap-xds:18000", "no http:// scheme"),
            ("host:0", "not a port"),
            ("host:http", "not a port"),
            (":18000", "bad host"),
            ("::1:18000", "bad host"),
        ] {
            let error = parse_server_uri(bad).expect_err(bad);
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }

    #[test]
    fn the_flags_parse_with_their_defaults() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BootstrapArgs,
        }
        let cli =
            Cli::try_parse_from(["bootstrap", "--server-uri", "cloudmap-xds.internal:18000", "--zone", "us-east-1a"])
                .expect("parses");
        let a = cli.args;
        assert_eq!(a.server_uri, "cloudmap-xds.internal:18000");
        assert_eq!(a.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(a.cluster, "cloudmap-xds-client");
        assert_eq!(a.output, PathBuf::from("-"));
        assert_eq!(a.metadata_timeout, Duration::from_secs(1));
        assert!(Cli::try_parse_from(["bootstrap", "--server-uri", "nope"]).is_err());
        for (text, want) in [("500ms", Some(500)), ("1s", Some(1000)), ("1.5", Some(1500)), ("0s", None), ("x", None)] {
            assert_eq!(parse_timeout(text).ok().map(|d| d.as_millis() as u64), want, "{text}");
        }
    }
}
