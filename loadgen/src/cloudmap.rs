//! Cloud Map (moto) through the AWS SDK: create the namespace and services
//! the benchmark serves, and register the instances that make up changes.
//! Only control-plane APIs are called here (no `data-` host prefix applies).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use anyhow::{Context, anyhow};
use aws_sdk_servicediscovery as sd;
use aws_sdk_servicediscovery::error::DisplayErrorContext;
use futures::{StreamExt, TryStreamExt};

use crate::client::MARKER_ATTRIBUTE;
use crate::{REGION, ZONES};

/// A client for the Cloud Map emulator at `endpoint`, with dummy credentials.
pub async fn connect(endpoint: &str) -> sd::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(sd::config::Credentials::new("loadgen", "loadgen", None, None, "loadgen"))
        .load()
        .await;
    sd::Client::new(&sdk)
}

fn sdk<E: std::error::Error + 'static, R: std::fmt::Debug + 'static>(
    operation: &str,
) -> impl FnOnce(sd::error::SdkError<E, R>) -> anyhow::Error + '_ {
    move |e| anyhow!("{operation}: {}", DisplayErrorContext(&e))
}

/// The attributes ECS service discovery registers for a task, plus the
/// change marker when the instance stands for a change.
pub fn attributes(ip: Ipv4Addr, zone: &str, change: Option<u64>) -> BTreeMap<String, String> {
    let mut attributes: BTreeMap<String, String> = [
        ("AWS_INSTANCE_IPV4", ip.to_string()),
        ("AWS_INSTANCE_PORT", "50051".to_string()),
        ("AVAILABILITY_ZONE", zone.to_string()),
        ("REGION", REGION.to_string()),
        ("ECS_CLUSTER_NAME", "loadgen".to_string()),
        ("ECS_SERVICE_NAME", "bench".to_string()),
        ("ECS_TASK_DEFINITION_FAMILY", "bench".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(change) = change {
        attributes.insert(MARKER_ATTRIBUTE.to_string(), change.to_string());
    }
    attributes
}

/// Instance `i` of service number `service`: zones round robin, unique addresses.
pub fn instance(service: usize, i: usize) -> (String, BTreeMap<String, String>) {
    let ip = Ipv4Addr::new(10, (service % 250) as u8, (i / 250) as u8, (i % 250 + 1) as u8);
    (format!("i-{service}-{i}"), attributes(ip, ZONES[i % ZONES.len()], None))
}

/// The instance registered for change `k` (in a range no seeded instance uses).
pub fn change_instance(k: u64) -> (String, BTreeMap<String, String>) {
    let ip = Ipv4Addr::new(10, 255, ((k / 250) % 256) as u8, (k % 250 + 1) as u8);
    (format!("loadgen-change-{k}"), attributes(ip, ZONES[(k as usize) % ZONES.len()], Some(k)))
}

/// The id of the namespace with this name, if any.
pub async fn find_namespace(client: &sd::Client, name: &str) -> anyhow::Result<Option<String>> {
    let mut pages = client.list_namespaces().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(sdk("ListNamespaces"))?;
        if let Some(ns) = page.namespaces().iter().find(|ns| ns.name() == Some(name)) {
            return Ok(ns.id().map(str::to_string));
        }
    }
    Ok(None)
}

/// The id of service `service` in namespace `namespace_id`, if any. moto
/// ignores ListServices filters, so each candidate's namespace is checked.
pub async fn find_service(client: &sd::Client, namespace_id: &str, service: &str) -> anyhow::Result<Option<String>> {
    let mut pages = client.list_services().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(sdk("ListServices"))?;
        for summary in page.services().iter().filter(|s| s.name() == Some(service)) {
            let Some(id) = summary.id() else { continue };
            let out = client.get_service().id(id).send().await.map_err(sdk("GetService"))?;
            if out.service().and_then(|s| s.namespace_id()) == Some(namespace_id) {
                return Ok(Some(id.to_string()));
            }
        }
    }
    Ok(None)
}

/// The service id of `namespace`/`service`, or an error that says to seed first.
pub async fn service_id(client: &sd::Client, namespace: &str, service: &str) -> anyhow::Result<String> {
    let missing = || anyhow!("no Cloud Map service {service} in namespace {namespace}: run `loadgen seed` first");
    let ns = find_namespace(client, namespace).await?.ok_or_else(missing)?;
    find_service(client, &ns, service).await?.ok_or_else(missing)
}

pub async fn register(
    client: &sd::Client,
    service_id: &str,
    instance_id: &str,
    attributes: BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let attributes: HashMap<String, String> = attributes.into_iter().collect();
    client
        .register_instance()
        .service_id(service_id)
        .instance_id(instance_id)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(sdk("RegisterInstance"))?;
    Ok(())
}

/// Create (or reuse) the namespace and services, and register `instances`
/// instances in each service. Returns the number of registrations.
pub async fn seed(
    client: &sd::Client,
    namespace: &str,
    services: &[String],
    instances: usize,
    concurrency: usize,
) -> anyhow::Result<usize> {
    let ns = match find_namespace(client, namespace).await? {
        Some(id) => id,
        None => {
            client.create_http_namespace().name(namespace).send().await.map_err(sdk("CreateHttpNamespace"))?;
            find_namespace(client, namespace).await?.with_context(|| format!("namespace {namespace} not created"))?
        }
    };
    let mut jobs = Vec::new();
    for (s, name) in services.iter().enumerate() {
        let id = match find_service(client, &ns, name).await? {
            Some(id) => id,
            None => {
                let out =
                    client.create_service().name(name).namespace_id(&ns).send().await.map_err(sdk("CreateService"))?;
                out.service().and_then(|s| s.id()).map(str::to_string).context("CreateService returned no id")?
            }
        };
        jobs.extend((0..instances).map(|i| (id.clone(), instance(s, i))));
    }
    let count = jobs.len();
    futures::stream::iter(jobs)
        .map(|(id, (instance_id, attributes))| async move { register(client, &id, &instance_id, attributes).await })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_have_unique_addresses_and_change_markers() {
        let mut seen = std::collections::HashSet::new();
        for s in 0..3 {
            for i in 0..600 {
                let (_, a) = instance(s, i);
                assert!(seen.insert(a["AWS_INSTANCE_IPV4"].clone()));
            }
        }
        let (id, a) = change_instance(7);
        assert_eq!(id, "loadgen-change-7");
        assert_eq!(a[MARKER_ATTRIBUTE], "7");
        assert!(seen.insert(a["AWS_INSTANCE_IPV4"].clone()));
        assert_eq!(instance(0, 4).1["AVAILABILITY_ZONE"], "us-east-1b");
    }
}
