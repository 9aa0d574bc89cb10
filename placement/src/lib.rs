//! Where this process runs: its availability zone, its region and a name for
//! it, looked up the way AWS workloads find them — ECS task metadata v4
//! (`GET ${ECS_CONTAINER_METADATA_URI_V4}/task`: `AvailabilityZone`,
//! `TaskARN`), then EC2 instance metadata (IMDSv2: a session token, then
//! `placement/availability-zone` and `placement/region`), then the
//! environment (`AWS_REGION`, `AWS_DEFAULT_REGION`, the host name).
//!
//! Used by `cloudmap-xds bootstrap` (the client's xDS locality), demo-server
//! (the zone it reports) and the demo client's tooling. [`Environment`] is
//! what the process environment says, passed in so tests need not touch it;
//! [`locate`] does the look-ups, only for what the caller does not know yet.
//! Metadata failures are reported in the [`Location`], never fatal.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Default EC2 instance metadata endpoint (IPv4).
pub const IMDS_DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Default EC2 instance metadata endpoint when
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`.
pub const IMDS_DEFAULT_ENDPOINT_IPV6: &str = "http://[fd00:ec2::254]";
/// Lifetime asked for the IMDSv2 session token (the SDKs' default, 6 hours).
const IMDS_TOKEN_TTL_SECONDS: &str = "21600";

/// What the look-ups need from the process environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// `ECS_CONTAINER_METADATA_URI_V4`; `None` when not on ECS.
    pub ecs_metadata_uri: Option<String>,
    /// Base URL of EC2 instance metadata; `None` when disabled.
    pub imds_endpoint: Option<String>,
    /// Timeout of each metadata request.
    pub metadata_timeout: Duration,
    /// `AWS_REGION`, else `AWS_DEFAULT_REGION`.
    pub aws_region: Option<String>,
    /// This machine's host name.
    pub hostname: Option<String>,
}

impl Environment {
    /// Reads the real process environment (and the host name).
    pub fn from_process_env(metadata_timeout: Duration) -> Environment {
        let mut env = Environment::from_vars(|name| std::env::var(name).ok(), metadata_timeout);
        env.hostname = hostname();
        env
    }

    /// Builds the environment from a variable lookup; `hostname` is left unset.
    /// The IMDS endpoint follows the AWS SDKs: `AWS_EC2_METADATA_SERVICE_ENDPOINT`,
    /// else the IPv4 (or, with `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`,
    /// IPv6) default; none with `AWS_EC2_METADATA_DISABLED=true`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, metadata_timeout: Duration) -> Environment {
        let get = |name: &str| non_empty(var(name));
        let imds_disabled = get("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let imds_endpoint = if imds_disabled {
            None
        } else {
            Some(get("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| {
                let ipv6 =
                    get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE").is_some_and(|m| m.eq_ignore_ascii_case("ipv6"));
                if ipv6 { IMDS_DEFAULT_ENDPOINT_IPV6 } else { IMDS_DEFAULT_ENDPOINT }.to_owned()
            }))
        };
        Environment {
            ecs_metadata_uri: get("ECS_CONTAINER_METADATA_URI_V4"),
            imds_endpoint,
            metadata_timeout,
            aws_region: get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION")),
            hostname: None,
        }
    }
}

/// Where the zone came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneSource {
    /// The caller knew it (a flag).
    Given,
    EcsTaskMetadata,
    Ec2InstanceMetadata,
    /// No zone was found.
    None,
}

impl fmt::Display for ZoneSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ZoneSource::Given => "given",
            ZoneSource::EcsTaskMetadata => "ECS task metadata",
            ZoneSource::Ec2InstanceMetadata => "EC2 instance metadata",
            ZoneSource::None => "not found",
        })
    }
}

/// What [`locate`] found, and why a look-up it tried failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub zone: Option<String>,
    pub zone_source: ZoneSource,
    pub region: Option<String>,
    /// The ECS task id (the end of its ARN), when the task metadata was read.
    pub ecs_task_id: Option<String>,
    /// Why the ECS task metadata could not be read (when it was tried).
    pub ecs_error: Option<String>,
    /// Why EC2 instance metadata could not be read (when it was needed).
    pub imds_error: Option<String>,
}

/// Looks up the zone and region the caller does not know yet (and the ECS
/// task id when `want_task_id`): ECS task metadata first, then EC2 instance
/// metadata, then `AWS_REGION` for the region. A region given or derivable
/// from a given zone (`us-east-1a` → `us-east-1`) needs no look-up.
pub async fn locate(
    env: &Environment,
    zone: Option<String>,
    region: Option<String>,
    want_task_id: bool,
) -> anyhow::Result<Location> {
    let client = reqwest::Client::builder()
        .timeout(env.metadata_timeout)
        .connect_timeout(env.metadata_timeout)
        // Metadata endpoints are link-local: never send them through a proxy.
        .no_proxy()
        .build()
        .context("building the HTTP client for instance metadata")?;
    let mut zone = non_empty(zone);
    let mut zone_source = if zone.is_some() { ZoneSource::Given } else { ZoneSource::None };
    let mut region = non_empty(region).or_else(|| zone.as_deref().and_then(region_from_zone));
    let mut ecs_task_id = None;
    let mut ecs_error = None;
    if let (true, Some(base)) = (zone.is_none() || region.is_none() || want_task_id, &env.ecs_metadata_uri) {
        match fetch_task_metadata(&client, base).await {
            Ok(task) => {
                let task_zone = non_empty(task.availability_zone);
                if zone.is_none() && task_zone.is_some() {
                    zone.clone_from(&task_zone);
                    zone_source = ZoneSource::EcsTaskMetadata;
                }
                if region.is_none() {
                    region = task
                        .task_arn
                        .as_deref()
                        .and_then(region_from_arn)
                        .or_else(|| task_zone.as_deref().and_then(region_from_zone));
                }
                ecs_task_id = task.task_arn.as_deref().and_then(task_id_from_arn);
            }
            Err(e) => ecs_error = Some(format!("{e:#}")),
        }
    }
    let mut imds_error = None;
    if zone.is_none() || region.is_none() {
        match &env.imds_endpoint {
            Some(base) => match fetch_placement(&client, base).await {
                Ok(placement) => {
                    if zone.is_none() {
                        zone = Some(placement.zone.clone());
                        zone_source = ZoneSource::Ec2InstanceMetadata;
                    }
                    if region.is_none() {
                        region = placement.region.or_else(|| region_from_zone(&placement.zone));
                    }
                }
                Err(e) => imds_error = Some(format!("{e:#}")),
            },
            None => imds_error = Some("disabled by AWS_EC2_METADATA_DISABLED=true".to_owned()),
        }
    }
    if region.is_none() {
        region.clone_from(&env.aws_region);
    }
    Ok(Location { zone, zone_source, region, ecs_task_id, ecs_error, imds_error })
}

/// The fields used from the ECS task metadata v4 `/task` document.
#[derive(Debug, Default, Deserialize)]
struct TaskMetadata {
    #[serde(rename = "AvailabilityZone")]
    availability_zone: Option<String>,
    #[serde(rename = "TaskARN")]
    task_arn: Option<String>,
}

/// What EC2 instance metadata says about placement.
#[derive(Debug)]
struct Placement {
    zone: String,
    region: Option<String>,
}

/// `GET ${base}/task`.
async fn fetch_task_metadata(client: &reqwest::Client, base: &str) -> anyhow::Result<TaskMetadata> {
    let url = format!("{}/task", base.trim_end_matches('/'));
    let body = client
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url}"))?
        .bytes()
        .await
        .with_context(|| format!("reading the body of {url}"))?;
    serde_json::from_slice(&body).with_context(|| format!("parsing the JSON from {url}"))
}

/// IMDSv2: a session token, then the zone (required) and region (optional).
async fn fetch_placement(client: &reqwest::Client, base: &str) -> anyhow::Result<Placement> {
    let base = base.trim_end_matches('/');
    let token_url = format!("{base}/latest/api/token");
    let token = client
        .put(&token_url)
        .header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL_SECONDS)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("PUT {token_url}"))?
        .text()
        .await
        .with_context(|| format!("reading the token from {token_url}"))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("PUT {token_url} returned an empty token");
    }
    let get = |path: &str| {
        let url = format!("{base}/latest/meta-data/placement/{path}");
        async move {
            let text = client
                .get(&url)
                .header("X-aws-ec2-metadata-token", token)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("GET {url}"))?
                .text()
                .await
                .with_context(|| format!("reading the body of {url}"))?;
            non_empty(Some(text)).with_context(|| format!("GET {url} returned nothing"))
        }
    };
    let zone = get("availability-zone").await?;
    // Older instance metadata lacks placement/region; the zone's name tells it.
    let region = get("region").await.ok();
    Ok(Placement { zone, region })
}

/// Treats empty or blank strings as absent.
pub fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// The region field of an ARN: `arn:aws:ecs:us-east-1:123:task/...` → `us-east-1`.
pub fn region_from_arn(arn: &str) -> Option<String> {
    let mut parts = arn.split(':');
    if parts.next() != Some("arn") {
        return None;
    }
    non_empty(parts.nth(2).map(str::to_owned))
}

/// The task id at the end of an ECS task ARN:
/// `arn:aws:ecs:REGION:ACCOUNT:task/CLUSTER/ID` (or the older `task/ID`) → `ID`.
pub fn task_id_from_arn(arn: &str) -> Option<String> {
    let resource = arn.splitn(6, ':').nth(5)?;
    let rest = resource.strip_prefix("task/")?;
    non_empty(rest.rsplit('/').next().map(str::to_owned))
}

/// The region of an availability-zone name: everything up to and including
/// the digits of the first dash-separated part that starts with a digit.
/// `us-east-1a` → `us-east-1`, `us-west-2-lax-1a` (a Local Zone) → `us-west-2`.
pub fn region_from_zone(zone: &str) -> Option<String> {
    let mut region: Vec<&str> = Vec::new();
    for part in zone.split('-') {
        if part.starts_with(|c: char| c.is_ascii_digit()) {
            let digits_end = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
            if region.is_empty() {
                return None;
            }
            region.push(&part[..digits_end]);
            return Some(region.join("-"));
        }
        region.push(part);
    }
    None
}

/// The host name: `$HOSTNAME`, else the kernel's (Linux), else `/etc/hostname`.
pub fn hostname() -> Option<String> {
    non_empty(std::env::var("HOSTNAME").ok())
        .or_else(|| non_empty(std::fs::read_to_string("/proc/sys/kernel/hostname").ok()))
        .or_else(|| non_empty(std::fs::read_to_string("/etc/hostname").ok()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn environment_follows_the_sdk_variables() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            Environment::from_vars(|name| map.get(name).cloned(), Duration::from_secs(1))
        };
        let env = vars(&[]);
        assert_eq!(env.imds_endpoint.as_deref(), Some(IMDS_DEFAULT_ENDPOINT));
        assert_eq!(env.ecs_metadata_uri, None);
        assert_eq!(env.aws_region, None);

        let env = vars(&[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1338"),
            ("ECS_CONTAINER_METADATA_URI_V4", "http://169.254.170.2/v4/x"),
            ("AWS_DEFAULT_REGION", "eu-west-3"),
        ]);
        assert_eq!(env.imds_endpoint.as_deref(), Some("http://127.0.0.1:1338"));
        assert_eq!(env.ecs_metadata_uri.as_deref(), Some("http://169.254.170.2/v4/x"));
        assert_eq!(env.aws_region.as_deref(), Some("eu-west-3"));

        let env = vars(&[("AWS_REGION", "us-east-1"), ("AWS_DEFAULT_REGION", "x")]);
        assert_eq!(env.aws_region.as_deref(), Some("us-east-1"));
        let env = vars(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")]);
        assert_eq!(env.imds_endpoint.as_deref(), Some(IMDS_DEFAULT_ENDPOINT_IPV6));
        let env = vars(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]);
        assert_eq!(env.imds_endpoint, None);
        let env = vars(&[("AWS_EC2_METADATA_DISABLED", "false")]);
        assert!(env.imds_endpoint.is_some());
    }

    #[test]
    fn arn_and_zone_helpers() {
        let arn = "arn:aws:ecs:eu-west-1:123456789012:task/demo/abc123";
        assert_eq!(region_from_arn(arn).as_deref(), Some("eu-west-1"));
        assert_eq!(task_id_from_arn(arn).as_deref(), Some("abc123"));
        assert_eq!(task_id_from_arn("arn:aws:ecs:us-east-1:1:task/0123abcd").as_deref(), Some("0123abcd"));
        assert_eq!(task_id_from_arn("arn:aws:iam::1:role/x"), None);
        assert_eq!(region_from_zone("us-east-1a").as_deref(), Some("us-east-1"));
        assert_eq!(region_from_zone("us-west-2-lax-1a").as_deref(), Some("us-west-2"));
        assert_eq!(region_from_zone("zone-a"), None);
        assert_eq!(region_from_zone("ap-southeast-2c").as_deref(), Some("ap-southeast-2"));
        assert_eq!(region_from_zone("us-gov-west-1b").as_deref(), Some("us-gov-west-1"));
        assert_eq!(region_from_zone("unknown"), None);
        assert_eq!(region_from_zone("1a"), None);
        assert_eq!(region_from_zone(""), None);
        assert_eq!(region_from_arn("not-an-arn"), None);
    }

    #[test]
    fn task_metadata_parses_the_fields_used() {
        let doc = r#"{
            "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/default",
            "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/default/158d1c8083dd49d6b527399fd6414f5c",
            "AvailabilityZone": "us-west-2d",
            "Containers": []
        }"#;
        let metadata: TaskMetadata = serde_json::from_str(doc).expect("parses");
        assert_eq!(metadata.availability_zone.as_deref(), Some("us-west-2d"));
        assert_eq!(metadata.task_arn.as_deref().and_then(region_from_arn).as_deref(), Some("us-west-2"));
    }
}
