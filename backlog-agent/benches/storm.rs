//! `cargo xtask bench` (second part): the UNIX connect() EAGAIN storm and
//! the cost of the connect() hooks, side by side:
//! 1. the storm's EAGAIN rate without a tracer, with the agent (default
//!    settings, JSON to a pipe) and with bpftrace printing one line per
//!    EAGAIN, as ratios;
//! 2. kernel ns per call of each program (kernel.bpf_stats: run_time_ns /
//!    run_cnt), for the storm and for plain TCP connect()s, which every
//!    connect() on a machine pays;
//! 3. agent (and bpftrace) CPU per EAGAIN;
//! 4. events printed, aggregated and lost, and whether
//!    events + aggregated + lost = the EAGAINs the client saw.
//!
//! Figures from one run on one machine, not assertions. Bounded: each
//! phase runs STORM seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashMap,
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{storm, Agent};

const STORM: Duration = Duration::from_secs(3);
const TCP_CONNECTS: u64 = 200_000;
/// Below the ephemeral port range, so every connect() gets a port.
const SUCCESS_CONNECTS: u64 = 20_000;

/// (name, run_time_ns, run_cnt) of every loaded BPF program, by id.
fn bpf_programs() -> HashMap<u32, (String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| {
            (
                p.id(),
                (
                    p.name_as_str().unwrap_or("?").to_owned(),
                    p.run_time().as_nanos() as u64,
                    p.run_count(),
                ),
            )
        })
        .collect()
}

/// Per program that ran between the two snapshots: name, calls, ns/call.
fn bpf_costs(
    before: &HashMap<u32, (String, u64, u64)>,
    after: &HashMap<u32, (String, u64, u64)>,
) -> Vec<(String, u64, f64)> {
    let mut out: Vec<(String, u64, f64)> = after
        .iter()
        .filter_map(|(id, (name, ns, cnt))| {
            let (ns0, cnt0) = before.get(id).map_or((0, 0), |(_, n, c)| (*n, *c));
            let calls = cnt - cnt0;
            (calls > 0).then(|| (name.clone(), calls, (ns - ns0) as f64 / calls as f64))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn print_costs(what: &str, costs: &[(String, u64, f64)]) {
    for (name, calls, ns) in costs {
        println!("    {what}: {name}: {calls} calls, {ns:.0} ns per call");
    }
}

/// CPU time (user + system) a process has used so far.
fn process_cpu(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// One storm against a fresh full listener in `dir`.
fn one_storm(dir: &Path, name: &str) -> (storm::Storm, String) {
    let path = dir.join(name);
    let (listener, held) = storm::full_listener(&path, 4);
    let result = storm::storm(&path, u64::MAX, STORM);
    storm::release(held);
    drop(listener);
    (result, path.to_string_lossy().into_owned())
}

/// connect()s to a closed port on loopback: the connect() hooks' cost for
/// what is not AF_UNIX. Blocking ones are refused at once; non-blocking
/// ones return EINPROGRESS (the usual answer for event-driven clients).
fn tcp_connects(nonblocking: bool) -> Duration {
    common::in_new_netns(move || {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        for _ in 0..TCP_CONNECTS {
            if nonblocking {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .expect("socket");
                socket.set_nonblocking(true).expect("non-blocking");
                let _ = socket.connect(&to.into());
            } else {
                let _ = std::net::TcpStream::connect(to);
            }
        }
        started.elapsed()
    })
}

/// connect()s that return 0: blocking TCP ones to a listener that
/// accepts (SUCCESS_CONNECTS of them: each takes a local port), or UDP
/// ones (TCP_CONNECTS; connect() on UDP returns 0 at once, as for DNS
/// clients). These are the non-UNIX calls the exit-only connect() hook
/// cannot leave on the return value alone: it reads the address family.
fn successful_connects(udp: bool) -> (Duration, u64) {
    common::in_new_netns(move || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        if udp {
            let started = Instant::now();
            for _ in 0..TCP_CONNECTS {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
                let _ = socket.connect(to);
            }
            return (started.elapsed(), TCP_CONNECTS);
        }
        // Accepted by this thread after each connect(), so the queue
        // never overflows (a SYN retransmission would take a second).
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let started = Instant::now();
        for _ in 0..SUCCESS_CONNECTS {
            let _ = std::net::TcpStream::connect(to);
            while let Ok((stream, _)) = listener.accept() {
                // Closed with a RST: a TIME_WAIT on the server's side
                // would make a later client on the same port wait for a
                // SYN retransmission.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
        let elapsed = started.elapsed();
        (elapsed, SUCCESS_CONNECTS)
    })
}

/// Kernel ns per call of a program that does one load and one comparison
/// on sys_exit_connect (bpftrace's filter on `ret`), over non-blocking TCP
/// connect()s: what bpf_stats itself adds to every program on this host,
/// to read the agent's figures against.
fn stats_floor() -> Result<(u64, f64), String> {
    let mut child = Command::new(common::outside("bpftrace"))
        .args([
            "-e",
            "tracepoint:syscalls:sys_exit_connect /args->ret == 12345/ { }",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Attached once a program on sys_exit_connect shows up.
    let before = bpf_programs();
    let deadline = Instant::now() + Duration::from_secs(60);
    let floor_id = loop {
        let now = bpf_programs();
        if let Some(id) = now
            .iter()
            .find(|(id, (name, ..))| !before.contains_key(id) && name.starts_with("sys_exit_conn"))
            .map(|(id, _)| *id)
        {
            break Some(id);
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let b0 = bpf_programs();
    tcp_connects(true);
    let b1 = bpf_programs();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let _ = child.wait();
    let id = floor_id.ok_or("bpftrace attached no program within 60 s")?;
    let (ns0, cnt0) = b0.get(&id).map_or((0, 0), |(_, n, c)| (*n, *c));
    let (ns1, cnt1) = b1.get(&id).map_or((0, 0), |(_, n, c)| (*n, *c));
    let calls = cnt1.saturating_sub(cnt0);
    Ok((calls, (ns1 - ns0) as f64 / calls.max(1) as f64))
}

/// Sums what the agent accounted for `path`: events, aggregated, lost.
fn accounted(run: &common::AgentRun, path: &str) -> (u64, u64, u64, u64) {
    let (mut events, mut aggregated, mut lost, mut total) = (0, 0, 0, 0);
    for r in run.json_events() {
        if r["listener"]["path"] != path {
            continue;
        }
        if r["kind"] == "listener_summary" {
            let c = &r["accounting"]["unix_connect_backlog_full"];
            lost += c["lost"].as_u64().unwrap_or(0);
            total += c["total"].as_u64().unwrap_or(0);
        } else if r["aggregated"] == true {
            aggregated += r["count"].as_u64().unwrap_or(0);
        } else if r["kind"] == "unix_connect_backlog_full" {
            events += 1;
        }
    }
    (events, aggregated, lost, total)
}

/// 200 new UNIX listeners, each hit by a 20 ms storm, one after the other:
/// the case where every listener is new to the agent's attribution.
const NEW_LISTENERS: usize = 200;
const SHORT_STORM: Duration = Duration::from_millis(20);
const IDLE_PROCESSES: usize = 3000;

/// The many-listeners run under a fresh agent: its CPU, and what it
/// accounted against what the clients saw.
struct ManyListeners {
    eagain: u64,
    events: u64,
    aggregated: u64,
    lost: u64,
    agent_cpu: Duration,
}

fn many_listeners(dir: &Path, tag: &str) -> ManyListeners {
    let agent = Agent::expect_ready(&["--output", "json"]);
    let cpu0 = process_cpu(agent.pid());
    let mut eagain = 0;
    let mut paths = Vec::new();
    for i in 0..NEW_LISTENERS {
        let path = dir.join(format!("{tag}-{i}.sock"));
        let (listener, held) = storm::full_listener(&path, 4);
        eagain += storm::storm(&path, u64::MAX, SHORT_STORM).eagain;
        storm::release(held);
        drop(listener);
        paths.push(path.to_string_lossy().into_owned());
    }
    thread::sleep(Duration::from_millis(1200));
    let agent_cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let run = agent.stop();
    let (mut events, mut aggregated, mut lost) = (0, 0, 0);
    for path in &paths {
        let (e, a, l, _) = accounted(&run, path);
        events += e;
        aggregated += a;
        lost += l;
    }
    ManyListeners {
        eagain,
        events,
        aggregated,
        lost,
        agent_cpu,
    }
}

fn report_many(what: &str, m: &ManyListeners) {
    println!(
        "  {what}: {} EAGAINs; events {}, aggregated {}, lost {} (identity {}); agent CPU {:.3} s",
        m.eagain,
        m.events,
        m.aggregated,
        m.lost,
        if m.events + m.aggregated + m.lost == m.eagain {
            "holds"
        } else {
            "BROKEN"
        },
        m.agent_cpu.as_secs_f64()
    );
}

/// (a) A spoofed-source SYN flood over a raw socket, inside a private
/// namespace (recipe: kernel-notes.md, "Floods at real rates"): the
/// listener on 198.18.0.1 never accepts, the SYN-ACKs to the spoofed
/// 198.19.x.y sources are routed into lo and lost, so the SYN queue stays
/// full and every further SYN is TCPReqQFullDrop (cookies 0) or
/// TCPReqQFullDoCookies (cookies 1). Returns the counter's growth per
/// second, and the counter's growth.
const SYN_FLOOD: Duration = Duration::from_secs(3);

fn checksum(words: impl Iterator<Item = u16>) -> u16 {
    let mut sum: u32 = words.map(u32::from).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 SYN from `src:sport` to 198.18.0.1:`dport`, checksummed.
fn syn_packet(src: [u8; 4], sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 5 words of header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[198, 18, 0, 1]);
    // The kernel fills in the IP header checksum (IP_HDRINCL).
    let tcp = 20;
    p[tcp..tcp + 2].copy_from_slice(&sport.to_be_bytes());
    p[tcp + 2..tcp + 4].copy_from_slice(&dport.to_be_bytes());
    p[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    p[tcp + 12] = 5 << 4; // 5 words of header
    p[tcp + 13] = 0x02; // SYN
    p[tcp + 14..tcp + 16].copy_from_slice(&65535u16.to_be_bytes());
    let pseudo = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([198, 18]),
        u16::from_be_bytes([0, 1]),
        libc::IPPROTO_TCP as u16,
        20,
    ];
    let segment: Vec<u16> = p[tcp..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let sum = checksum(pseudo.into_iter().chain(segment));
    p[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ip(args: &str) {
    let status = Command::new(common::outside("ip"))
        .args(args.split_whitespace())
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {args} failed");
}

fn syn_flood(cookies: &'static str) -> (f64, u64) {
    common::in_new_netns(move || {
        common::set_sysctl("net.ipv4.tcp_syncookies", cookies);
        ip("addr add 198.18.0.1/32 dev lo");
        ip("route add 198.19.0.0/16 dev lo");
        let listener = TcpListener::bind("198.18.0.1:80").expect("bind 198.18.0.1:80");
        // SAFETY: listen on a valid socket fd.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 64) };
        // SAFETY: a raw socket; closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_in for 198.18.0.1, the only destination.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes([198, 18, 0, 1]);
        let counter = if cookies == "0" {
            "TCPReqQFullDrop"
        } else {
            "TCPReqQFullDoCookies"
        };
        let before = common::tcp_ext();
        let started = Instant::now();
        let mut i: u32 = 0;
        while started.elapsed() < SYN_FLOOD {
            for _ in 0..256 {
                i = i.wrapping_add(1);
                let src = [198, 19, (i >> 8) as u8, i as u8];
                let packet = syn_packet(src, 1024 + (i % 50_000) as u16, 80, i);
                // SAFETY: a valid buffer and sockaddr_in of the right size.
                unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
            }
        }
        let elapsed = started.elapsed();
        let after = common::tcp_ext();
        // SAFETY: closing the raw socket opened above.
        unsafe { libc::close(fd) };
        drop(listener);
        let n = common::counter_delta(&before, &after, counter);
        (n as f64 / elapsed.as_secs_f64(), n)
    })
}

fn main() {
    if !common::privileged("bench storm") {
        return;
    }
    // Run-time statistics for every BPF program while this fd is open.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    if let Err(err) = &stats {
        println!("kernel.bpf_stats unavailable ({err}): no ns per call");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    println!("backlog storm bench on {}", common::kernel_release());

    let syn_without: Vec<(f64, u64)> = ["0", "1"].into_iter().map(syn_flood).collect();
    let (without, _) = one_storm(dir.path(), "none.sock");
    let tcp_without = tcp_connects(false);
    let tcp_nb_without = tcp_connects(true);

    let agent = Agent::expect_ready(&["--output", "json"]);
    let syn_cpu0 = process_cpu(agent.pid());
    let syn_p0 = bpf_programs();
    let syn_with: Vec<(f64, u64)> = ["0", "1"].into_iter().map(syn_flood).collect();
    let syn_p1 = bpf_programs();
    thread::sleep(Duration::from_millis(1200));
    let syn_cpu = process_cpu(agent.pid()).saturating_sub(syn_cpu0);
    let cpu0 = process_cpu(agent.pid());
    let p0 = bpf_programs();
    let (with, path) = one_storm(dir.path(), "agent.sock");
    let p1 = bpf_programs();
    // The agent's last window and drain are part of its cost.
    thread::sleep(Duration::from_millis(1200));
    let agent_cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let p2 = bpf_programs();
    let tcp_with = tcp_connects(false);
    let p3 = bpf_programs();
    let tcp_nb_with = tcp_connects(true);
    let p4 = bpf_programs();
    let accepted_with = successful_connects(false);
    let p5 = bpf_programs();
    let udp_with = successful_connects(true);
    let p6 = bpf_programs();
    let run = agent.stop();
    let accepted_without = successful_connects(false);
    let udp_without = successful_connects(true);
    let floor = stats_floor();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    let (events, aggregated, lost, total) = accounted(&run, &path);

    // bpftrace, the same one-line question.
    let out = dir.path().join("bpftrace.out");
    let bpftrace = Command::new(common::outside("bpftrace"))
        .args([
            "-e",
            "tracepoint:syscalls:sys_exit_connect /args->ret == -11/ { printf(\"%d %s\\n\", pid, comm); }",
        ])
        .stdout(fs::File::create(&out).expect("bpftrace output file"))
        .stderr(Stdio::null())
        .spawn();
    let bpftrace_figures = match bpftrace {
        Ok(mut child) => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("Attaching")
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
            let cpu0 = process_cpu(child.id());
            let b0 = bpf_programs();
            let (storm, _) = one_storm(dir.path(), "bpftrace.sock");
            let b1 = bpf_programs();
            thread::sleep(Duration::from_millis(1200));
            let cpu = process_cpu(child.id()).saturating_sub(cpu0);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
            let lines = fs::read_to_string(&out).unwrap_or_default().lines().count() as u64;
            Some((storm, cpu, bpf_costs(&b0, &b1), lines))
        }
        Err(err) => {
            println!("bpftrace not run: {err} (`cargo xtask setup` installs it)");
            None
        }
    };

    println!(
        "(a) spoofed-source SYN flood over a raw socket, {} s per phase, listener backlog 64:",
        SYN_FLOOD.as_secs()
    );
    for (i, cookies) in ["0", "1"].iter().enumerate() {
        println!(
            "  tcp_syncookies={cookies}: without agent {:.0} drops/s, with {:.0}/s ({:.3}x)",
            syn_without[i].0,
            syn_with[i].0,
            syn_with[i].0 / syn_without[i].0
        );
    }
    let syn_drops: u64 = syn_with.iter().map(|(_, n)| n).sum();
    println!(
        "  agent CPU: {:.3} s for {syn_drops} SYNs ({:.2} us per SYN); kernel cost:",
        syn_cpu.as_secs_f64(),
        syn_cpu.as_secs_f64() * 1e6 / syn_drops.max(1) as f64
    );
    print_costs("agent", &bpf_costs(&syn_p0, &syn_p1));
    println!(
        "(b) UNIX EAGAIN storm, {} s per phase, one client looping non-blocking connect() to a full listener:",
        STORM.as_secs()
    );
    println!("  without tracer: {:.0} EAGAIN/s", without.rate());
    println!(
        "  with backlog-agent: {:.0} EAGAIN/s ({:.3}x)",
        with.rate(),
        with.rate() / without.rate()
    );
    if let Some((storm, ..)) = &bpftrace_figures {
        println!(
            "  with bpftrace printf: {:.0} EAGAIN/s ({:.3}x)",
            storm.rate(),
            storm.rate() / without.rate()
        );
    }
    println!("  kernel cost during the storm with the agent:");
    print_costs("agent", &bpf_costs(&p0, &p1));
    if let Some((_, _, costs, _)) = &bpftrace_figures {
        print_costs("bpftrace", costs);
    }
    println!(
        "  agent CPU: {:.3} s for {} EAGAINs = {:.2} us per EAGAIN",
        agent_cpu.as_secs_f64(),
        with.eagain,
        agent_cpu.as_secs_f64() * 1e6 / with.eagain.max(1) as f64
    );
    if let Some((storm, cpu, _, lines)) = &bpftrace_figures {
        println!(
            "  bpftrace CPU: {:.3} s for {} EAGAINs = {:.2} us per EAGAIN ({lines} lines)",
            cpu.as_secs_f64(),
            storm.eagain,
            cpu.as_secs_f64() * 1e6 / storm.eagain.max(1) as f64
        );
        let agent_per = agent_cpu.as_secs_f64() / with.eagain.max(1) as f64;
        let bpftrace_per = cpu.as_secs_f64() / storm.eagain.max(1) as f64;
        if bpftrace_per > 0.0 {
            println!(
                "  agent CPU per EAGAIN / bpftrace's: {:.3}",
                agent_per / bpftrace_per
            );
        }
    }
    println!(
        "  events printed {events}, aggregated {aggregated}, lost {lost}; kernel total {total}; \
         client saw {} EAGAINs: identity {}",
        with.eagain,
        if events + aggregated + lost == with.eagain && total == with.eagain {
            "holds"
        } else {
            "BROKEN"
        }
    );
    println!(
        "TCP connect() (refused, loopback), {TCP_CONNECTS} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
        TCP_CONNECTS as f64 / tcp_without.as_secs_f64(),
        TCP_CONNECTS as f64 / tcp_with.as_secs_f64(),
        tcp_without.as_secs_f64() / tcp_with.as_secs_f64()
    );
    print_costs("agent", &bpf_costs(&p2, &p3));
    println!(
        "TCP connect() (non-blocking, EINPROGRESS), {TCP_CONNECTS} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
        TCP_CONNECTS as f64 / tcp_nb_without.as_secs_f64(),
        TCP_CONNECTS as f64 / tcp_nb_with.as_secs_f64(),
        tcp_nb_without.as_secs_f64() / tcp_nb_with.as_secs_f64()
    );
    print_costs("agent", &bpf_costs(&p3, &p4));
    for (what, without, with, costs) in [
        (
            "TCP connect() (blocking, accepted)",
            accepted_without,
            accepted_with,
            bpf_costs(&p4, &p5),
        ),
        ("UDP connect()", udp_without, udp_with, bpf_costs(&p5, &p6)),
    ] {
        println!(
            "{what}, {} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
            with.1,
            without.1 as f64 / without.0.as_secs_f64(),
            with.1 as f64 / with.0.as_secs_f64(),
            without.0.as_secs_f64() / with.0.as_secs_f64()
        );
        print_costs("agent", &costs);
    }
    match &floor {
        Ok((calls, ns)) => println!(
            "bpf_stats floor: a program doing one load and one comparison on sys_exit_connect \
             (bpftrace filter), {calls} non-blocking TCP connect()s: {ns:.0} ns per call; \
             subtract it from the figures above for the programs' own cost"
        ),
        Err(err) => println!("bpf_stats floor not measured: {err}"),
    }
    drop(stats);

    println!(
        "(e) {NEW_LISTENERS} new UNIX listeners, each hit by a {} ms storm:",
        SHORT_STORM.as_millis()
    );
    let quiet = many_listeners(dir.path(), "quiet");
    report_many("on this machine as it is", &quiet);
    let mut idle: Vec<std::process::Child> = (0..IDLE_PROCESSES)
        .filter_map(|_| {
            Command::new(common::outside("sleep"))
                .arg("600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect();
    let busy = many_listeners(dir.path(), "busy");
    report_many(&format!("with {} more idle processes", idle.len()), &busy);
    println!(
        "  agent CPU with them / without: {:.2}",
        busy.agent_cpu.as_secs_f64() / quiet.agent_cpu.as_secs_f64().max(1e-3)
    );
    for child in &mut idle {
        let _ = child.kill();
        let _ = child.wait();
    }
}
