//! The launch environment: which rank this process is, out of how many, and where rank 0 listens, read from the
//! variables torchrun or srun set. Parsing works on a lookup (a map in tests), so nothing here writes the process
//! environment.
//!
//! Which launcher is believed:
//! - **torchrun** (also `zeroconv launch`, and any launcher speaking PyTorch's `env://` convention) when any of
//!   `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` is set; then all four are required, and `MASTER_ADDR` /
//!   `MASTER_PORT` too when the world has more than one process. These win over SLURM's variables, so `srun torchrun
//!   ...` uses torchrun's ranks, not the per-node task ids.
//! - **SLURM** (`srun zeroconv train ...`) when `SLURM_PROCID` is set: rank `SLURM_PROCID`, world `SLURM_NTASKS`
//!   (or `SLURM_STEP_NUM_TASKS`, the step's task count), local rank `SLURM_LOCALID`, processes on this node
//!   `SLURM_NTASKS_PER_NODE` (or this node's entry of `SLURM_STEP_TASKS_PER_NODE` / `SLURM_TASKS_PER_NODE`, e.g.
//!   `4(x2)`). SLURM says nothing about a master, so `MASTER_ADDR` / `MASTER_PORT` must be exported by the batch
//!   script when the world has more than one process.
//! - Otherwise a single process (world 1).
//!
//! Every inconsistent or missing value is one error naming the variable.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt;

/// Who set the variables a [`DistEnv`] came from (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    /// torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`LOCAL_WORLD_SIZE` (also `zeroconv launch`).
    Torchrun,
    /// srun's `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`.
    Slurm,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Launcher::Single => "no launcher",
            Launcher::Torchrun => "torchrun",
            Launcher::Slurm => "SLURM",
        })
    }
}

/// This process's place in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank on this node, `0..local_world_size`: the GPU this process drives.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Where rank 0 listens (host name or address). `127.0.0.1` for a single process.
    pub master_addr: String,
    /// Rank 0's port. 0 for a single process (nothing listens).
    pub master_port: u16,
    /// Where the values came from.
    pub launcher: Launcher,
}

const TORCHRUN_VARS: [&str; 4] = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"];

impl DistEnv {
    /// One process: rank 0 of a world of 1.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            launcher: Launcher::Single,
        }
    }

    /// Parses the launcher variables out of `map` (the process environment, or a test's map).
    pub fn from_map(map: &HashMap<String, String>) -> Result<DistEnv> {
        DistEnv::from_lookup(|name| map.get(name).cloned())
    }

    /// Parses the launcher variables out of `(name, value)` pairs.
    pub fn from_vars<K: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (K, V)>) -> Result<DistEnv> {
        let map: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        DistEnv::from_map(&map)
    }

    /// Parses the launcher variables of this process's environment (read only).
    pub fn from_process_env() -> Result<DistEnv> {
        DistEnv::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Parses the launcher variables through `get` (a variable's value, `None` when unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        if TORCHRUN_VARS.iter().any(|v| get(v).is_some()) {
            torchrun(&get)
        } else if get("SLURM_PROCID").is_some() {
            slurm(&get)
        } else {
            Ok(DistEnv::single())
        }
    }

    /// More than one process.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// `MASTER_ADDR:MASTER_PORT`, bracketing an IPv6 address.
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// Checks that the launch matches the config: `world_size == trainer.devices × trainer.num_nodes`, and (with a
    /// launcher) `trainer.devices` processes on this node.
    pub fn check_world_size(&self, devices: usize, num_nodes: usize) -> Result<()> {
        let want = devices.checked_mul(num_nodes).ok_or_else(|| {
            Error::msg(format!("trainer.devices={devices} × trainer.num_nodes={num_nodes} overflows"))
        })?;
        if want == 0 {
            return Err(Error::msg(format!(
                "trainer.devices={devices} and trainer.num_nodes={num_nodes} must both be at least 1"
            )));
        }
        let (world_var, local_var) = match self.launcher {
            Launcher::Single => {
                if want == 1 {
                    return Ok(());
                }
                return Err(Error::msg(format!(
                    "trainer.devices={devices} × trainer.num_nodes={num_nodes} asks for {want} processes, but this is \
                     a single process (no RANK/WORLD_SIZE or SLURM_PROCID in the environment): launch one process \
                     per GPU (`torchrun --nproc-per-node {devices} --nnodes {num_nodes} --no-python zeroconv train \
                     ...`, `srun --ntasks-per-node {devices} zeroconv train ...` or `zeroconv launch \
                     --nproc-per-node {devices} train ...`), or set trainer.devices=1 trainer.num_nodes=1"
                )));
            }
            Launcher::Torchrun => ("WORLD_SIZE", "LOCAL_WORLD_SIZE"),
            Launcher::Slurm => ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"),
        };
        if self.world_size != want {
            return Err(Error::msg(format!(
                "{world_var}={} ({} launch) but trainer.devices={devices} × trainer.num_nodes={num_nodes} = {want}: \
                 launch {want} processes or set trainer.devices and trainer.num_nodes to match the launch",
                self.world_size, self.launcher
            )));
        }
        if self.local_world_size != devices {
            return Err(Error::msg(format!(
                "{local_var}={} processes on this node ({} launch) but trainer.devices={devices} (GPUs per node; \
                 trainer.num_nodes={num_nodes}): launch {devices} processes per node or set trainer.devices and \
                 trainer.num_nodes to match the launch",
                self.local_world_size, self.launcher
            )));
        }
        Ok(())
    }
}

/// A required variable: set and not empty.
fn required(get: &impl Fn(&str) -> Option<String>, name: &str, why: &str) -> Result<String> {
    match get(name) {
        None => Err(Error::msg(format!("{name} is not set ({why})"))),
        Some(v) if v.trim().is_empty() => Err(Error::msg(format!("{name} is set but empty ({why})"))),
        Some(v) => Ok(v.trim().to_string()),
    }
}

fn parse_count(name: &str, value: &str) -> Result<usize> {
    value.parse::<usize>().map_err(|_| Error::msg(format!("{name}={value:?} is not a non-negative integer")))
}

fn at_least_one(name: &str, value: usize) -> Result<usize> {
    if value == 0 {
        return Err(Error::msg(format!("{name}=0: must be at least 1")));
    }
    Ok(value)
}

/// Checks `index < count`, naming both variables.
fn below(index_name: &str, index: usize, count_name: &str, count: usize) -> Result<()> {
    if index >= count {
        return Err(Error::msg(format!("{index_name}={index} is out of range: it must be below {count_name}={count}")));
    }
    Ok(())
}

/// `MASTER_ADDR` / `MASTER_PORT`: required with more than one process, defaults for one.
fn master(get: &impl Fn(&str) -> Option<String>, world_size: usize, why: &str) -> Result<(String, u16)> {
    if world_size == 1 && get("MASTER_ADDR").is_none() && get("MASTER_PORT").is_none() {
        return Ok(("127.0.0.1".into(), 0));
    }
    let addr = required(get, "MASTER_ADDR", why)?;
    let port_text = required(get, "MASTER_PORT", why)?;
    let port = match port_text.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => p as u16,
        _ => {
            return Err(Error::msg(format!("MASTER_PORT={port_text:?} is not a TCP port (an integer from 1 to 65535)")))
        }
    };
    Ok((addr, port))
}

fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
    const WHY: &str = "torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT \
                       together; set all of them or none";
    let mut values = [0usize; 4];
    for (value, name) in values.iter_mut().zip(TORCHRUN_VARS) {
        *value = parse_count(name, &required(get, name, WHY)?)?;
    }
    let [rank, world_size, local_rank, local_world_size] = values;
    at_least_one("WORLD_SIZE", world_size)?;
    at_least_one("LOCAL_WORLD_SIZE", local_world_size)?;
    below("RANK", rank, "WORLD_SIZE", world_size)?;
    below("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size)?;
    if local_world_size > world_size {
        return Err(Error::msg(format!(
            "LOCAL_WORLD_SIZE={local_world_size} processes on this node is more than WORLD_SIZE={world_size}"
        )));
    }
    let (master_addr, master_port) = master(get, world_size, WHY)?;
    Ok(DistEnv {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        launcher: Launcher::Torchrun,
    })
}

fn slurm(get: &impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
    const WHY: &str = "srun sets it for every task; run zeroconv under srun";
    let rank = parse_count("SLURM_PROCID", &required(get, "SLURM_PROCID", WHY)?)?;
    let world_var = if get("SLURM_NTASKS").is_some() || get("SLURM_STEP_NUM_TASKS").is_none() {
        "SLURM_NTASKS"
    } else {
        "SLURM_STEP_NUM_TASKS"
    };
    let world_size = at_least_one(world_var, parse_count(world_var, &required(get, world_var, WHY)?)?)?;
    let local_rank = parse_count("SLURM_LOCALID", &required(get, "SLURM_LOCALID", WHY)?)?;
    below("SLURM_PROCID", rank, world_var, world_size)?;
    let (local_var, local_world_size) = slurm_tasks_on_this_node(get)?;
    at_least_one(local_var, local_world_size)?;
    below("SLURM_LOCALID", local_rank, local_var, local_world_size)?;
    if local_world_size > world_size {
        return Err(Error::msg(format!(
            "{local_var} gives {local_world_size} tasks on this node, more than {world_var}={world_size}"
        )));
    }
    let (master_addr, master_port) = master(
        get,
        world_size,
        "SLURM does not say where rank 0 listens: export MASTER_ADDR=$(scontrol show hostnames \
         \"$SLURM_JOB_NODELIST\" | head -n 1) and MASTER_PORT (e.g. 29500) in the batch script before srun",
    )?;
    Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, launcher: Launcher::Slurm })
}

/// Tasks on this node: `SLURM_NTASKS_PER_NODE`, else this node's entry of `SLURM_STEP_TASKS_PER_NODE` or
/// `SLURM_TASKS_PER_NODE` (SLURM's compressed list, e.g. `4(x2),2`; `SLURM_NODEID` picks the entry when the nodes
/// differ). Returns the variable used and the count.
fn slurm_tasks_on_this_node(get: &impl Fn(&str) -> Option<String>) -> Result<(&'static str, usize)> {
    if get("SLURM_NTASKS_PER_NODE").is_some() {
        let v = required(get, "SLURM_NTASKS_PER_NODE", "srun --ntasks-per-node sets it")?;
        return Ok(("SLURM_NTASKS_PER_NODE", parse_count("SLURM_NTASKS_PER_NODE", &v)?));
    }
    let Some(name) = ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"].into_iter().find(|n| get(n).is_some())
    else {
        return Err(Error::msg(
            "SLURM_NTASKS_PER_NODE is not set (nor SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE): launch with \
             srun --ntasks-per-node N, N the GPUs per node",
        ));
    };
    let text = required(get, name, "srun sets it")?;
    let per_node = parse_tasks_per_node(&text)
        .ok_or_else(|| Error::msg(format!("{name}={text:?} is not a SLURM task list such as `4` or `4(x2),2`")))?;
    if per_node.iter().all(|&n| n == per_node[0]) {
        return Ok((name, per_node[0]));
    }
    let node = parse_count(
        "SLURM_NODEID",
        &required(get, "SLURM_NODEID", &format!("needed to pick this node's entry of {name}={text:?}"))?,
    )?;
    match per_node.get(node) {
        Some(&n) => Ok((name, n)),
        None => Err(Error::msg(format!(
            "SLURM_NODEID={node} is out of range: {name}={text:?} lists {} nodes",
            per_node.len()
        ))),
    }
}

/// Expands SLURM's compressed per-node task list (`4(x2),2` → `[4, 4, 2]`).
fn parse_tasks_per_node(text: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')')?.parse::<usize>().ok()?),
            None => (item, 1),
        };
        let count = count.parse::<usize>().ok()?;
        if repeat == 0 || repeat > 1 << 20 {
            return None;
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tasks_per_node_lists() {
        assert_eq!(super::parse_tasks_per_node("4"), Some(vec![4]));
        assert_eq!(super::parse_tasks_per_node("4(x2),2"), Some(vec![4, 4, 2]));
        assert_eq!(super::parse_tasks_per_node("4(x"), None);
        assert_eq!(super::parse_tasks_per_node(""), None);
    }
}
