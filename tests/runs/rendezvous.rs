//! Data-parallel launch environment and rendezvous (issue 12, parts 1–2): torchrun/SLURM variable parsing, and the
//! TCP rendezvous with its host store, run with ranks as threads on 127.0.0.1. Every test binds its own port 0, so
//! tests run in parallel; timeouts are short so the file finishes in a few seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};
use zeroconv::engine::dist::{DistEnv, Hello, Launcher, Rendezvous, RendezvousListener, Timeouts, BLOB_LEN};
use zeroconv::Result;

// ---------------------------------------------------------------- launch environment

fn env(vars: &[(&str, &str)]) -> Result<DistEnv> {
    DistEnv::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn err(vars: &[(&str, &str)]) -> String {
    match env(vars) {
        Ok(e) => panic!("expected an error for {vars:?}, got {e:?}"),
        Err(e) => {
            eprintln!("env error: {e}");
            e.to_string()
        }
    }
}

const TORCHRUN: [(&str, &str); 6] = [
    ("RANK", "5"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "1"),
    ("LOCAL_WORLD_SIZE", "4"),
    ("MASTER_ADDR", "node0.cluster"),
    ("MASTER_PORT", "29500"),
];

fn torchrun_with(change: &[(&str, Option<&str>)]) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&str, String)> = TORCHRUN.iter().map(|(k, v)| (*k, v.to_string())).collect();
    for (k, val) in change {
        v.retain(|(name, _)| name != k);
        if let Some(val) = val {
            let k: &'static str = TORCHRUN.iter().find(|(n, _)| n == k).map(|(n, _)| *n).unwrap_or("?");
            v.push((k, val.to_string()));
        }
    }
    v
}

fn torchrun_err(change: &[(&str, Option<&str>)]) -> String {
    let v = torchrun_with(change);
    let pairs: Vec<(&str, &str)> = v.iter().map(|(k, v)| (*k, v.as_str())).collect();
    err(&pairs)
}

#[test]
fn no_launcher_is_a_single_process() {
    let e = env(&[("PATH", "/usr/bin"), ("SLURM_NTASKS", "8")]).unwrap();
    assert_eq!(e, DistEnv::single());
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (0, 1, 0, 1));
    assert!(!e.is_distributed());
    e.check_world_size(1, 1).unwrap();
    let m = e.check_world_size(8, 1).unwrap_err().to_string();
    assert!(m.contains("trainer.devices=8") && m.contains("trainer.num_nodes=1") && m.contains("torchrun"), "{m}");
}

#[test]
fn torchrun_variables() {
    let e = env(&TORCHRUN).unwrap();
    assert_eq!(
        e,
        DistEnv {
            rank: 5,
            world_size: 8,
            local_rank: 1,
            local_world_size: 4,
            master_addr: "node0.cluster".into(),
            master_port: 29500,
            launcher: Launcher::Torchrun,
        }
    );
    assert_eq!(e.master(), "node0.cluster:29500");
    assert!(e.is_distributed());
    e.check_world_size(4, 2).unwrap();
    // torchrun's ranks win over SLURM's (srun torchrun ...).
    let mut both = TORCHRUN.to_vec();
    both.extend([("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")]);
    assert_eq!(env(&both).unwrap().rank, 5);
    // A world of one needs no master; an IPv6 master is bracketed.
    let one = env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")]).unwrap();
    assert_eq!((one.world_size, one.launcher), (1, Launcher::Torchrun));
    let v6 = env(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "fe80::1"),
        ("MASTER_PORT", "1234"),
    ])
    .unwrap();
    assert_eq!(v6.master(), "[fe80::1]:1234");
}

/// Variables to change in the torchrun set (`None`: unset).
type Changes = Vec<(&'static str, Option<&'static str>)>;
type Vars = Vec<(&'static str, &'static str)>;

#[test]
fn torchrun_errors_name_the_variable() {
    let cases: Vec<(Changes, Vec<&str>)> = vec![
        (vec![("WORLD_SIZE", None)], vec!["WORLD_SIZE is not set"]),
        (vec![("LOCAL_RANK", None)], vec!["LOCAL_RANK is not set"]),
        (vec![("LOCAL_WORLD_SIZE", None)], vec!["LOCAL_WORLD_SIZE is not set"]),
        (vec![("RANK", Some(""))], vec!["RANK is set but empty"]),
        (vec![("RANK", Some("two"))], vec!["RANK=\"two\"", "not a non-negative integer"]),
        (vec![("RANK", Some("-1"))], vec!["RANK=\"-1\""]),
        (vec![("RANK", Some("8"))], vec!["RANK=8", "WORLD_SIZE=8"]),
        (vec![("WORLD_SIZE", Some("0"))], vec!["WORLD_SIZE=0", "at least 1"]),
        (vec![("LOCAL_RANK", Some("4"))], vec!["LOCAL_RANK=4", "LOCAL_WORLD_SIZE=4"]),
        (vec![("LOCAL_WORLD_SIZE", Some("16"))], vec!["LOCAL_WORLD_SIZE=16", "WORLD_SIZE=8"]),
        (vec![("MASTER_ADDR", None)], vec!["MASTER_ADDR is not set"]),
        (vec![("MASTER_PORT", None)], vec!["MASTER_PORT is not set"]),
        (vec![("MASTER_PORT", Some("0"))], vec!["MASTER_PORT=\"0\"", "TCP port"]),
        (vec![("MASTER_PORT", Some("70000"))], vec!["MASTER_PORT=\"70000\""]),
        (vec![("MASTER_PORT", Some("http"))], vec!["MASTER_PORT=\"http\""]),
    ];
    for (change, wants) in cases {
        let m = torchrun_err(&change);
        for w in wants {
            assert!(m.contains(w), "{change:?}: {m:?} should contain {w:?}");
        }
    }
}

#[test]
fn slurm_variables() {
    let base = [
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NTASKS_PER_NODE", "4"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29400"),
    ];
    let e = env(&base).unwrap();
    assert_eq!(
        e,
        DistEnv {
            rank: 6,
            world_size: 8,
            local_rank: 2,
            local_world_size: 4,
            master_addr: "10.0.0.1".into(),
            master_port: 29400,
            launcher: Launcher::Slurm,
        }
    );
    e.check_world_size(4, 2).unwrap();
    // Tasks per node from the step's compressed list; the world from the step's task count.
    let step = [
        ("SLURM_PROCID", "1"),
        ("SLURM_STEP_NUM_TASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ("MASTER_ADDR", "n0"),
        ("MASTER_PORT", "29400"),
    ];
    let e = env(&step).unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (1, 8, 1, 4));
    // Nodes with different task counts: SLURM_NODEID picks this node's.
    let uneven = [
        ("SLURM_PROCID", "8"),
        ("SLURM_NTASKS", "9"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_TASKS_PER_NODE", "4(x2),1"),
        ("SLURM_NODEID", "2"),
        ("MASTER_ADDR", "n0"),
        ("MASTER_PORT", "29400"),
    ];
    assert_eq!(env(&uneven).unwrap().local_world_size, 1);
    // One task needs no master.
    let one =
        env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1"), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS_PER_NODE", "1")])
            .unwrap();
    assert_eq!((one.world_size, one.launcher), (1, Launcher::Slurm));
}

#[test]
fn slurm_errors_name_the_variable() {
    let full: Vec<(&str, &str)> = vec![
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "2"),
        ("MASTER_ADDR", "n0"),
        ("MASTER_PORT", "29400"),
    ];
    let without =
        |names: &[&str]| -> Vec<(&str, &str)> { full.iter().filter(|(k, _)| !names.contains(k)).cloned().collect() };
    let with = |k: &'static str, v: &'static str| -> Vec<(&str, &str)> {
        let mut x = without(&[k]);
        x.push((k, v));
        x
    };
    let cases: Vec<(Vars, Vec<&str>)> = vec![
        (without(&["MASTER_ADDR", "MASTER_PORT"]), vec!["MASTER_ADDR is not set", "scontrol show hostnames"]),
        (without(&["MASTER_PORT"]), vec!["MASTER_PORT is not set"]),
        (without(&["SLURM_NTASKS"]), vec!["SLURM_NTASKS is not set", "srun"]),
        (without(&["SLURM_LOCALID"]), vec!["SLURM_LOCALID is not set"]),
        (without(&["SLURM_NTASKS_PER_NODE"]), vec!["SLURM_NTASKS_PER_NODE is not set", "--ntasks-per-node"]),
        (with("SLURM_PROCID", "4"), vec!["SLURM_PROCID=4", "SLURM_NTASKS=4"]),
        (with("SLURM_LOCALID", "2"), vec!["SLURM_LOCALID=2", "SLURM_NTASKS_PER_NODE=2"]),
        (with("SLURM_NTASKS", "x"), vec!["SLURM_NTASKS=\"x\""]),
        (with("SLURM_NTASKS_PER_NODE", "8"), vec!["SLURM_NTASKS_PER_NODE", "SLURM_NTASKS=4"]),
    ];
    for (vars, wants) in cases {
        let m = err(&vars);
        for w in wants {
            assert!(m.contains(w), "{vars:?}: {m:?} should contain {w:?}");
        }
    }
    let mut bad_list = without(&["SLURM_NTASKS_PER_NODE"]);
    bad_list.push(("SLURM_TASKS_PER_NODE", "2(x"));
    assert!(err(&bad_list).contains("SLURM_TASKS_PER_NODE=\"2(x\""));
    let mut uneven = without(&["SLURM_NTASKS_PER_NODE"]);
    uneven.push(("SLURM_TASKS_PER_NODE", "3,1"));
    assert!(err(&uneven).contains("SLURM_NODEID is not set"));
}

#[test]
fn world_size_must_match_the_config() {
    let e = env(&TORCHRUN).unwrap(); // 8 processes, 4 per node
    let m = e.check_world_size(8, 2).unwrap_err().to_string();
    assert!(m.contains("WORLD_SIZE=8") && m.contains("trainer.devices=8") && m.contains("trainer.num_nodes=2"), "{m}");
    assert!(m.contains("= 16"), "{m}");
    let m = e.check_world_size(2, 4).unwrap_err().to_string();
    assert!(m.contains("LOCAL_WORLD_SIZE=4") && m.contains("trainer.devices=2"), "{m}");
    let m = e.check_world_size(0, 1).unwrap_err().to_string();
    assert!(m.contains("trainer.devices=0"), "{m}");
}

// ---------------------------------------------------------------- rendezvous

const HASH: u64 = 0x0123_4567_89ab_cdef;

fn blob() -> [u8; BLOB_LEN] {
    std::array::from_fn(|i| (i * 7 + 3) as u8)
}

fn hello(rank: usize, world: usize) -> Hello {
    Hello { rank, world_size: world, local_rank: rank % 2, hostname: format!("host{}", rank / 2), graph_hash: HASH }
}

fn timeouts(join_ms: u64, collective_ms: u64) -> Timeouts {
    Timeouts { join: Duration::from_millis(join_ms), collective: Duration::from_millis(collective_ms) }
}

fn listen() -> RendezvousListener {
    RendezvousListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Runs `hellos[0]` as rank 0 (it must be rank 0) and the rest as connecting ranks, each on its own thread running
/// `body` on its rendezvous; returns each thread's outcome in the order of `hellos`.
fn run_ranks<T: Send + 'static>(
    hellos: Vec<Hello>,
    t: Timeouts,
    body: impl Fn(Rendezvous) -> Result<T> + Send + Sync + Clone + 'static,
) -> Vec<Result<T>> {
    let listener = listen();
    let addr = listener.local_addr();
    let mut handles = Vec::new();
    let mut hellos = hellos.into_iter();
    let root = hellos.next().unwrap();
    let b = body.clone();
    handles.push(thread::spawn(move || listener.serve(&root, &blob(), t).and_then(b)));
    for h in hellos {
        let b = body.clone();
        handles.push(thread::spawn(move || Rendezvous::connect(&addr.to_string(), &h, t).and_then(b)));
    }
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

fn message<T: std::fmt::Debug>(r: &Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            eprintln!("rendezvous error: {e}");
            e.to_string()
        }
    }
}

/// Values whose float sum depends on the order of addition.
fn contribution(rank: usize) -> Vec<f64> {
    let big = if rank.is_multiple_of(2) { 1e16 } else { -1e16 };
    vec![big, 1.0 + rank as f64 * 0.1, 1e-17 * (rank + 1) as f64, (rank as f64).sqrt(), -0.3]
}

#[test]
fn worlds_of_1_2_and_4_agree_bit_for_bit() {
    for world in [1usize, 2, 4] {
        let results = run_ranks((0..world).map(|r| hello(r, world)).collect(), timeouts(5000, 5000), |mut rv| {
            let rank = rv.rank;
            assert_eq!(rv.blob, blob());
            assert_eq!(rv.store.rank(), rank);
            let mut rounds = Vec::new();
            for round in 0..10u8 {
                rv.store.barrier()?;
                let mine: Vec<u8> = vec![round ^ rank as u8; rank * 3 + round as usize % 2];
                let gathered = rv.store.all_gather_bytes(&mine)?;
                let mut v = contribution(rank);
                v.push(round as f64);
                rv.store.all_reduce_f64_sum(&mut v)?;
                let bits: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
                rounds.push((gathered, bits));
            }
            let mut empty: [f64; 0] = [];
            rv.store.all_reduce_f64_sum(&mut empty)?;
            rv.store.barrier()?;
            Ok((rv.members.clone(), rounds))
        });
        let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
        for (members, rounds) in &results {
            assert_eq!(members, &results[0].0);
            assert_eq!(rounds, &results[0].1, "world {world}: every rank gets the same bits");
        }
        let members = &results[0].0;
        assert_eq!(members.len(), world);
        for (r, m) in members.iter().enumerate() {
            assert_eq!((m.rank, m.local_rank, m.hostname.clone()), (r, r % 2, format!("host{}", r / 2)));
        }
        for (round, (gathered, bits)) in results[0].1.iter().enumerate() {
            for (r, g) in gathered.iter().enumerate() {
                assert_eq!(g, &vec![round as u8 ^ r as u8; r * 3 + round % 2]);
            }
            // Rank order: ((v0 + v1) + v2) + v3.
            let mut want = contribution(0);
            want.push(round as f64);
            for r in 1..world {
                let mut c = contribution(r);
                c.push(round as f64);
                for (w, x) in want.iter_mut().zip(c) {
                    *w += x;
                }
            }
            assert_eq!(bits, &want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }
}

#[test]
fn a_single_process_joins_alone() {
    let mut made = false;
    let mut rv = Rendezvous::join(&DistEnv::single(), HASH, Timeouts::default(), || {
        made = true;
        Ok(blob())
    })
    .unwrap();
    assert!(made);
    assert_eq!((rv.rank, rv.world_size, rv.blob), (0, 1, blob()));
    rv.store.barrier().unwrap();
    assert_eq!(rv.store.all_gather_bytes(b"abc").unwrap(), vec![b"abc".to_vec()]);
    let mut v = [0.1, 0.2];
    rv.store.all_reduce_f64_sum(&mut v).unwrap();
    assert_eq!(v, [0.1, 0.2]);
    assert!(Rendezvous::single(&hello(0, 2), &blob()).is_err());
}

fn assert_all_contain(results: &[Result<()>], wants: &[&str]) {
    for (i, r) in results.iter().enumerate() {
        let m = message(r);
        for w in wants {
            assert!(m.contains(w), "thread {i}: {m:?} should contain {w:?}");
        }
    }
}

#[test]
fn a_duplicate_rank_is_refused_on_every_rank() {
    let results = run_ranks(vec![hello(0, 3), hello(1, 3), hello(1, 3)], timeouts(3000, 3000), |_| Ok(()));
    assert_all_contain(&results, &["duplicate rank 1", "own RANK"]);
    let m = message(&results[0]);
    assert_eq!(message(&results[1]), m, "every rank exits with rank 0's message");
    assert_eq!(message(&results[2]), m);
}

#[test]
fn a_second_rank_0_is_refused() {
    // A connecting rank must be 1..world; a hello claiming rank 0 (built by hand) is refused by rank 0.
    let m = message(&Rendezvous::connect("127.0.0.1:9", &hello(0, 2), timeouts(300, 300)));
    assert!(m.contains("only ranks 1 to 1 connect"), "{m}");
    let listener = listen();
    let addr = listener.local_addr();
    let root = thread::spawn(move || listener.serve(&hello(0, 2), &blob(), timeouts(3000, 3000)).map(|_| ()));
    let reply = raw_hello(addr, 1, 2, 0, HASH);
    let m = message(&root.join().unwrap());
    assert_eq!(reply, m);
    assert!(m.contains("second rank 0") && m.contains("rank 0 is already rank 0 (host host0"), "{m}");
}

#[test]
fn a_world_size_mismatch_is_refused_on_every_rank() {
    let mut other = hello(1, 3);
    other.world_size = 3;
    let results = run_ranks(vec![hello(0, 2), other], timeouts(3000, 3000), |_| Ok(()));
    assert_all_contain(&results, &["rank 1 (host host0, local rank 1)", "world size 3", "world size 2", "WORLD_SIZE"]);
    assert_eq!(message(&results[0]), message(&results[1]));
}

#[test]
fn a_graph_hash_mismatch_is_refused_on_every_rank() {
    let mut other = hello(2, 3);
    other.graph_hash = 0xdead_beef;
    let results = run_ranks(vec![hello(0, 3), hello(1, 3), other], timeouts(1500, 3000), |_| Ok(()));
    let wants = ["rank 2 (host host1", "different training step", "0x00000000deadbeef", "0x0123456789abcdef"];
    // Rank 0 and the refused rank always get the message.
    assert_all_contain(
        &[results[0].as_ref().map(|_| ()).map_err(copy), results[2].as_ref().map(|_| ()).map_err(copy)],
        &wants,
    );
    assert_eq!(message(&results[0]), message(&results[2]));
    // A bystander gets it too when it had connected by then; one that connects as rank 0 gives up finds it gone.
    let m = message(&results[1]);
    assert!(
        m == message(&results[0]) || m.contains("could not reach rank 0") || m.contains("closed the connection"),
        "{m}"
    );
}

fn copy(e: &zeroconv::Error) -> zeroconv::Error {
    zeroconv::Error::msg(e.to_string())
}

/// Connects and sends a hand-made hello (the documented wire format).
fn send_hello(addr: SocketAddr, version: u32, world: u32, rank: u32, hash: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = b"ZCRV".to_vec();
    for v in [version, world, rank, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    msg.extend_from_slice(&hash.to_le_bytes());
    msg.extend_from_slice(&3u16.to_le_bytes());
    msg.extend_from_slice(b"old");
    s.write_all(&msg).unwrap();
    s
}

/// Sends a hand-made hello and returns rank 0's refusal message.
fn raw_hello(addr: SocketAddr, version: u32, world: u32, rank: u32, hash: u64) -> String {
    let mut s = send_hello(addr, version, world, rank, hash);
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..4], b"ZCRV");
    assert_eq!(u32::from_le_bytes(head[4..8].try_into().unwrap()), 1);
    assert_eq!(head[8], 1, "refused");
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut text = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut text).unwrap();
    String::from_utf8(text).unwrap()
}

#[test]
fn a_rank_that_dies_during_the_rendezvous_is_named() {
    let listener = listen();
    let addr = listener.local_addr();
    let start = Instant::now();
    let root = thread::spawn(move || listener.serve(&hello(0, 3), &blob(), timeouts(3000, 3000)).map(|_| ()));
    drop(send_hello(addr, 1, 3, 2, HASH)); // rank 2 says hello, then its process dies
    let m = message(&root.join().unwrap());
    assert!(m.contains("rank 2 (host old, local rank 0) closed its connection while rank 0 waited"), "{m}");
    assert!(start.elapsed() < Duration::from_millis(2500), "took {:?}", start.elapsed());
}

#[test]
fn another_protocol_version_is_refused_and_strays_are_ignored() {
    // A connection that is not a zeroconv rank is dropped; the rendezvous goes on.
    let results = {
        let listener = listen();
        let addr = listener.local_addr();
        let root = thread::spawn(move || listener.serve(&hello(0, 2), &blob(), timeouts(5000, 3000)));
        let mut stray = TcpStream::connect(addr).unwrap();
        stray.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(stray);
        let one = Rendezvous::connect(&addr.to_string(), &hello(1, 2), timeouts(5000, 3000)).unwrap();
        let zero = root.join().unwrap().unwrap();
        (zero.blob, one.blob)
    };
    assert_eq!(results, (blob(), blob()));

    let listener = listen();
    let addr = listener.local_addr();
    let root = thread::spawn(move || listener.serve(&hello(0, 2), &blob(), timeouts(3000, 3000)).map(|_| ()));
    let reply = raw_hello(addr, 99, 2, 1, HASH);
    let m = message(&root.join().unwrap());
    assert_eq!(reply, m);
    assert!(m.contains("rank 1 (host old") && m.contains("protocol version 99") && m.contains("version 1"), "{m}");
}

#[test]
fn a_rank_that_never_arrives_times_out_naming_it() {
    let start = Instant::now();
    let results = run_ranks(vec![hello(0, 4), hello(1, 4), hello(3, 4)], timeouts(700, 3000), |_| Ok(()));
    let took = start.elapsed();
    assert_all_contain(&results, &["timed out after 0.7 s", "rank 2 of world size 4 never arrived", "MASTER_PORT"]);
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // A rank with nobody listening gives up after its own timeout, naming the address.
    let addr = listen().local_addr(); // bound then closed: nobody listens there now
    let start = Instant::now();
    let m = message(&Rendezvous::connect(&addr.to_string(), &hello(1, 2), timeouts(400, 400)));
    assert!(m.contains("could not reach rank 0") && m.contains(&addr.to_string()), "{m}");
    assert!(start.elapsed() < Duration::from_millis(2000));
}

#[test]
fn a_rank_that_dies_after_the_handshake_fails_the_next_collective() {
    let start = Instant::now();
    let results = run_ranks((0..3).map(|r| hello(r, 3)).collect(), timeouts(3000, 3000), |mut rv| {
        rv.store.barrier()?;
        if rv.rank == 2 {
            drop(rv); // the process "dies": its connection closes
            return Ok(());
        }
        rv.store.barrier()?;
        Ok(())
    });
    assert!(results[2].is_ok());
    assert_all_contain(&results[..2], &["rank 2 (host host1, local rank 0) closed its connection", "barrier #2"]);
    assert!(start.elapsed() < Duration::from_millis(2000), "took {:?}", start.elapsed());

    // Rank 0 dying: the others name it.
    let results = run_ranks((0..2).map(|r| hello(r, 2)).collect(), timeouts(3000, 3000), |mut rv| {
        if rv.rank == 0 {
            return Ok(());
        }
        let mut v = [1.0];
        rv.store.all_reduce_f64_sum(&mut v)?;
        Ok(())
    });
    assert!(results[0].is_ok());
    let m = message(&results[1]);
    assert!(m.contains("rank 0 (host host0, local rank 0) closed its connection during all_reduce_f64_sum #1"), "{m}");
}

#[test]
fn a_rank_that_stalls_in_a_collective_times_out_naming_it() {
    let start = Instant::now();
    let results = run_ranks((0..3).map(|r| hello(r, 3)).collect(), timeouts(3000, 500), |mut rv| {
        if rv.rank == 1 {
            thread::sleep(Duration::from_millis(1200));
            return Ok(());
        }
        let r = rv.store.barrier();
        // The store stays failed with the same message.
        let again = rv.store.barrier().unwrap_err().to_string();
        assert_eq!(r.as_ref().unwrap_err().to_string(), again);
        r
    });
    assert!(results[1].is_ok());
    let m = message(&results[0]);
    assert!(m.contains("rank 1 (host host0, local rank 1) did not reach barrier #1 within 0.5 s"), "{m}");
    assert_eq!(message(&results[2]), m, "rank 0 tells the others");
    assert!(start.elapsed() < Duration::from_millis(3000), "took {:?}", start.elapsed());
}

#[test]
fn mismatched_collectives_are_named() {
    let results = run_ranks((0..2).map(|r| hello(r, 2)).collect(), timeouts(3000, 3000), |mut rv| {
        if rv.rank == 0 {
            rv.store.barrier()
        } else {
            rv.store.all_gather_bytes(b"x").map(|_| ())
        }
    });
    assert_all_contain(&results, &["called all_gather_bytes #1 while rank 0 called barrier #1", "same order"]);

    let results = run_ranks((0..3).map(|r| hello(r, 3)).collect(), timeouts(3000, 3000), |mut rv| {
        let mut v = vec![1.0; if rv.rank == 2 { 3 } else { 2 }];
        rv.store.all_reduce_f64_sum(&mut v)
    });
    assert_all_contain(&results, &["rank 2 (host host1, local rank 0) gave 3 values but rank 0 gave 2"]);
}
