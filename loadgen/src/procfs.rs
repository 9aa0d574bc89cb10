//! Memory and CPU time of a process, from `/proc/PID/status` and `/proc/PID/stat`.

use anyhow::{Context, anyhow};

/// Linux reports CPU times in USER_HZ ticks, fixed at 100 on every mainstream architecture.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Usage {
    /// Resident set size.
    pub rss_bytes: u64,
    /// User + system CPU time of all threads.
    pub cpu_seconds: f64,
}

pub fn sample(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is the control plane running?)"))?;
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(Usage { rss_bytes: rss(&status)?, cpu_seconds: cpu(&stat)? })
}

fn rss(status: &str) -> anyhow::Result<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS line"))?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad {line:?}"))?.parse()?;
    Ok(kib * 1024)
}

fn cpu(stat: &str) -> anyhow::Result<f64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad /proc stat line"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime); `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).ok_or_else(|| anyhow!("short /proc stat line"))?.parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (cloudmap (x) y) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu(stat).expect("parses"), 3.25);
        assert_eq!(rss("Name:\tx\nVmRSS:\t  2048 kB\n").expect("parses"), 2048 * 1024);
        let me = sample(std::process::id()).expect("own process");
        assert!(me.rss_bytes > 0);
    }
}
