//! The `loadgen` binary: parses the command line and runs one subcommand;
//! the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use loadgen::cli::{Cli, Command, RunArgs};
use loadgen::{cloudmap, floor, proxy, run, startup};

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => measure(&cli.run).await,
        Some(Command::Run(args)) => measure(&args).await,
        Some(Command::Seed(args)) => seed(args).await,
        Some(Command::Startup(args)) => startup::run(&args).await.map(|report| {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }),
        Some(Command::CountProxy(args)) => proxy::serve(args.listen, args.upstream).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Floor(args)) => {
            let served = floor::Floor::new(&args.namespace, &args.service, args.endpoints);
            floor::serve(args.listen, args.admin, served).await.map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("loadgen: {e:#}");
        ExitCode::FAILURE
    })
}

async fn measure(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let report = run::run(args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.ok() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "loadgen: {} of {} receipts measured, {} clients failed: the run is incomplete",
        report.propagation.count, report.propagation.expected, report.failed_clients
    );
    Ok(ExitCode::FAILURE)
}

async fn seed(args: loadgen::cli::SeedArgs) -> anyhow::Result<ExitCode> {
    let client = cloudmap::connect(&args.cloudmap).await;
    let names: Vec<String> = if args.services == 1 {
        vec![args.service.clone()]
    } else {
        (0..args.services).map(|i| format!("{}-{i:03}", args.service)).collect()
    };
    let started = std::time::Instant::now();
    let count = cloudmap::seed(&client, &args.namespace, &names, args.instances, args.concurrency).await?;
    eprintln!(
        "seeded {} service(s) × {} instances ({count} registrations) in namespace {} in {:.1} s",
        names.len(),
        args.instances,
        args.namespace,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
