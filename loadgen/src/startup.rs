//! Time to first served snapshot: start a control plane and measure from
//! process start until `/ready` answers 200 (the first Cloud Map sync is
//! done and streams are answered). The process is killed afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::StartupArgs;
use crate::procfs;

#[derive(Debug, Clone, Serialize)]
pub struct StartupReport {
    pub command: String,
    pub ready_seconds: f64,
    pub rss_bytes_at_ready: Option<u64>,
}

impl StartupReport {
    pub fn table(&self) -> String {
        let rss = self.rss_bytes_at_ready.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        format!(
            "command                  {}\nprocess start → /ready   {:.3} s\nRSS at ready             {rss}\n",
            self.command, self.ready_seconds
        )
    }
}

pub async fn run(args: &StartupArgs) -> anyhow::Result<StartupReport> {
    let Some((program, rest)) = args.command.split_first() else {
        bail!("give the control plane command after --");
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let url = format!("http://{}/ready", args.admin);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let pid = child.id();
    let ready = loop {
        if let Some(status) = child.try_wait()? {
            bail!("{program} exited with {status} before it was ready");
        }
        if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            break started.elapsed();
        }
        if started.elapsed() > args.timeout {
            bail!("{url} did not answer 200 within {:?}", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let rss_bytes_at_ready = pid.and_then(|p| procfs::sample(p).ok()).map(|u| u.rss_bytes);
    child.kill().await.context("stopping the control plane")?;
    Ok(StartupReport { command: args.command.join(" "), ready_seconds: ready.as_secs_f64(), rss_bytes_at_ready })
}
