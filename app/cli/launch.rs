//! `zeroconv launch`: starts one process per device on this node with the variables torchrun sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), for users without torchrun, and
//! waits for them. When one process fails, the others are given time to stop on their own (the rendezvous makes
//! them fail naming it) and are then killed, so nothing is left behind.

use crate::error::{Error, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  zeroconv launch --nproc-per-node 8 train --config configs/controlnet_sd15.yaml trainer.devices=8\n  \
                  zeroconv launch --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr node0 --master-port 29500 \
                  train --config C trainer.devices=8 trainer.num_nodes=2"
)]
pub struct LaunchArgs {
    /// Processes on this node (one per device; `trainer.devices`).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub nproc_per_node: usize,
    /// Nodes in the job (`trainer.num_nodes`); run `zeroconv launch` once on each.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub nnodes: usize,
    /// This node's index, `0..nnodes`.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<usize>)]
    pub node_rank: usize,
    /// Where rank 0 (on node 0) listens.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rank 0's port; 0 picks a free one (one node only).
    #[arg(long, default_value_t = 29500, allow_negative_numbers = true, value_parser = crate::app::cli::whole::<u16>)]
    pub master_port: u16,
    /// The zeroconv command every process runs, e.g. `train --config C trainer.devices=2`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How long the other processes get to stop on their own after one fails.
const GRACE: Duration = Duration::from_secs(30);

pub fn run(args: &LaunchArgs) -> Result<()> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        return Err(Error::msg("--nproc-per-node and --nnodes must be at least 1"));
    }
    if args.node_rank >= args.nnodes {
        return Err(Error::msg(format!("--node-rank {} is not below --nnodes {}", args.node_rank, args.nnodes)));
    }
    if args.command.first().is_some_and(|c| c == "launch") {
        return Err(Error::msg("zeroconv launch starts zeroconv commands; it cannot start itself"));
    }
    let port = match args.master_port {
        0 if args.nnodes > 1 => {
            return Err(Error::msg(
                "--master-port 0 (a free port) works on one node only: give every node the same port",
            ))
        }
        0 => free_port(&args.master_addr)?,
        p => p,
    };
    let exe = std::env::current_exe().map_err(|e| Error::msg(format!("cannot find the zeroconv executable: {e}")))?;
    let world = args.nproc_per_node * args.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let spawned = Command::new(&exe)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match spawned {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                return Err(Error::msg(format!("starting rank {rank}: {e}")));
            }
        }
    }
    wait_all(children)
}

/// A port nothing listens on now, on `addr`.
fn free_port(addr: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0))
        .map_err(|e| Error::msg(format!("--master-port 0: cannot find a free port on {addr}: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| Error::msg(format!("--master-port 0: {e}")))
}

/// Waits for every process; after the first failure, the rest get [`GRACE`] to stop and are then killed. Fails
/// naming every rank that failed, those killed by a signal (the likely cause) first.
fn wait_all(mut running: Vec<(usize, Child)>) -> Result<()> {
    // (killed by a signal, rank, what happened), in the order seen.
    let mut failed: Vec<(bool, usize, String)> = Vec::new();
    let mut deadline: Option<Instant> = None;
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            match running[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = running.remove(i);
                    if !status.success() {
                        failed.push(describe(rank, status));
                        deadline.get_or_insert(Instant::now() + GRACE);
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let (rank, mut child) = running.remove(i);
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push((false, rank, format!("rank {rank} could not be waited for ({e})")));
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop(&mut running);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if failed.is_empty() {
        return Ok(());
    }
    failed.sort_by_key(|(signal, _, _)| !signal);
    let list: Vec<String> = failed.into_iter().map(|(_, _, what)| what).collect();
    Err(Error::msg(format!("{}; their errors, if any, are above", list.join("; "))))
}

/// (killed by a signal, rank, a phrase saying what happened).
fn describe(rank: usize, status: std::process::ExitStatus) -> (bool, usize, String) {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => (true, rank, format!("rank {rank} was killed by signal {sig}")),
        None => (false, rank, format!("rank {rank} failed ({status})")),
    }
}

/// Kills and reaps every process still running.
fn stop(running: &mut Vec<(usize, Child)>) {
    for (rank, child) in running.iter_mut() {
        if let Err(e) = child.kill() {
            eprintln!("zeroconv launch: stopping rank {rank}: {e}");
        }
        let _ = child.wait();
    }
    running.clear();
}
