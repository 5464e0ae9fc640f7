//! `cargo xtask bench wrapper`: resident memory, throughput and start-up latency of
//! `sp-wrapper`, measured against a discard master that acks everything at once.
//!
//! The discard master is a minimal WebSocket server on plain threads (handshake, frame
//! parsing, acks), so the benchmark needs no async runtime and xtask stays dependency-light.
//! It reads just enough of each frame to ack it (`type` and the trailing `seq`), so it costs
//! the wrapper's core as little as possible on a small machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Bytes streamed through the wrapper for the throughput figure.
const STREAM_BYTES: u64 = 1 << 30;
/// Runs behind the start-up latency median.
const LATENCY_RUNS: usize = 20;

/// What the wrapper must stay within on a minion (docs/PERFORMANCE.md).
const TARGET_RSS_KIB: u64 = 8 * 1024;
const TARGET_MB_S: f64 = 200.0;
const TARGET_RETURN: Duration = Duration::from_millis(20);

pub fn run(args: &[String]) -> Result<()> {
    // `--bin PATH` measures another build (a release from `cargo xtask dist`, or an older
    // commit's) instead of building this tree's.
    let given = match args {
        [] => None,
        [flag, path] if flag == "--bin" => Some(PathBuf::from(path)),
        _ => bail!("unexpected arguments {args:?}; usage: cargo xtask bench wrapper [--bin PATH]"),
    };
    let root = workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bin = match given {
        Some(bin) => bin,
        None => {
            eprintln!("Building sp-wrapper (release)...");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--release", "-p", "saltpeter-wrapper"])
                .current_dir(&root)
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build failed");
            }
            target.join("release/sp-wrapper")
        }
    };
    let scratch = target.join("bench-wrapper");
    std::fs::create_dir_all(&scratch)?;

    let master = DiscardMaster::start()?;
    let bench = Bench {
        bin,
        scratch: scratch.clone(),
        url: master.url(),
    };

    // 1. Resident memory of a wrapper whose job sleeps.
    let (rss, hwm) = bench.idle_rss(&master)?;

    // 2. Throughput: 1 GiB through the wrapper, beside cat to /dev/null.
    let data = scratch.join("stream-1GiB.txt");
    ensure_data(&data)?;
    let cat_null = time_shell(&format!("cat '{}' > /dev/null", data.display()))?;
    let cat_pipe = time_shell(&format!("cat '{}' | cat > /dev/null", data.display()))?;
    let (through, stream_hwm, stream_cpu) = bench.stream(&master, &data)?;

    // 3. Time until the invoking process returns.
    let mut returns = Vec::with_capacity(LATENCY_RUNS);
    for i in 0..LATENCY_RUNS {
        returns.push(bench.return_time(&master, i)?);
    }
    returns.sort_unstable();
    let median = returns[returns.len() / 2];

    let mb = STREAM_BYTES as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64();
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    println!();
    println!("sp-wrapper benchmark (release build, {} cores)", cores());
    println!(
        "  RSS, job sleeping:        VmRSS {rss} KiB, VmHWM {hwm} KiB   (target <= {TARGET_RSS_KIB} KiB: {})",
        verdict(hwm <= TARGET_RSS_KIB)
    );
    println!(
        "  Streaming 1 GiB:          {:.0} MB/s through the wrapper ({:.2} s, wrapper VmHWM {stream_hwm} KiB)   (target >= {TARGET_MB_S} MB/s: {})",
        rate(through),
        through.as_secs_f64(),
        verdict(rate(through) >= TARGET_MB_S)
    );
    println!(
        "    wrapper CPU time {:.2} s: {:.0} MB per CPU-second (its rate given a core of its own)",
        stream_cpu.as_secs_f64(),
        mb / stream_cpu.as_secs_f64().max(0.001)
    );
    println!(
        "    beside: cat file > /dev/null         {:.0} MB/s ({:.2} s)",
        rate(cat_null),
        cat_null.as_secs_f64()
    );
    println!(
        "            cat file | cat > /dev/null   {:.0} MB/s ({:.2} s)",
        rate(cat_pipe),
        cat_pipe.as_secs_f64()
    );
    println!(
        "  Invoking process returns: median {:.1} ms (min {:.1}, max {:.1}, {LATENCY_RUNS} runs)   (target <= {} ms: {})",
        ms(median),
        ms(returns[0]),
        ms(returns[returns.len() - 1]),
        TARGET_RETURN.as_millis(),
        verdict(median <= TARGET_RETURN)
    );
    Ok(())
}

struct Bench {
    bin: PathBuf,
    scratch: PathBuf,
    url: String,
}

impl Bench {
    fn command(&self, name: &str, command: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("SP_WEBSOCKET_URL", &self.url)
            .env("SP_JOB_NAME", name)
            .env("SP_JOB_INSTANCE", format!("{name}_1"))
            .env("SP_COMMAND", command)
            .env("SP_MACHINE_ID", "bench")
            .env("SP_WRAPPER_LOGDIR", self.scratch.join("log"))
            .env("SP_ALLOW_OVERLAP", "true")
            .stdin(Stdio::null());
        cmd
    }

    /// Launches the wrapper, checks the invoking process succeeded, returns how long it took.
    fn launch(&self, mut cmd: Command) -> Result<Duration> {
        let started = Instant::now();
        let out = cmd.output().context("running sp-wrapper")?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "sp-wrapper failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }

    fn idle_rss(&self, master: &DiscardMaster) -> Result<(u64, u64)> {
        let mut cmd = self.command("bench_idle", "sleep 4");
        cmd.env("SP_HEARTBEAT_INTERVAL", "1");
        self.launch(cmd)?;
        let pid = master.wait_start(Duration::from_secs(10))?;
        // Let it settle: a few heartbeats and an output interval.
        thread::sleep(Duration::from_millis(2500));
        let rss = vm_kib(pid, "VmRSS").context("reading VmRSS")?;
        let hwm = vm_kib(pid, "VmHWM").context("reading VmHWM")?;
        master.wait_complete(Duration::from_secs(10))?;
        Ok((rss, hwm))
    }

    fn stream(&self, master: &DiscardMaster, data: &Path) -> Result<(Duration, u64, Duration)> {
        let cmd = self.command("bench_stream", &format!("cat '{}'", data.display()));
        let started = Instant::now();
        self.launch(cmd)?;
        let done = master.wait_complete(Duration::from_secs(300))?;
        if done.bytes < STREAM_BYTES {
            bail!(
                "the master received only {} of {STREAM_BYTES} bytes",
                done.bytes
            );
        }
        Ok((done.at - started, done.hwm_kib, done.cpu))
    }

    fn return_time(&self, master: &DiscardMaster, i: usize) -> Result<Duration> {
        let took = self.launch(self.command(&format!("bench_return_{i}"), "true"))?;
        master.wait_complete(Duration::from_secs(10))?;
        Ok(took)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cores() -> usize {
    thread::available_parallelism().map_or(1, usize::from)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of a process, from `/proc/<pid>/stat` (in clock ticks of 10 ms,
/// the USER_HZ Linux exports on every architecture).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn time_shell(script: &str) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new("/bin/sh").args(["-c", script]).status()?;
    if !status.success() {
        bail!("{script} failed");
    }
    Ok(started.elapsed())
}

/// Writes 1 GiB of log-like text (lines of pseudo-random words, letters, digits and
/// punctuation; a 1 MiB block, repeated) unless the file is already there, and reads it once
/// so every measurement starts from a warm cache.
fn ensure_data(path: &Path) -> Result<()> {
    // The marker names the data's kind, so a file of an older kind is rewritten.
    let marker = path.with_extension("log-like");
    let fresh = marker.exists()
        && std::fs::metadata(path)
            .map(|m| m.len() == STREAM_BYTES)
            .unwrap_or(false);
    if !fresh {
        eprintln!("Writing {} ...", path.display());
        let mut block = Vec::with_capacity(1 << 20);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        while block.len() < (1 << 20) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            const ALPHABET: &[u8] =
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;=-_/()[]";
            let len = 40 + (state % 80) as usize;
            block.extend(
                (0..len).map(|i| ALPHABET[((state >> (i % 56)) % ALPHABET.len() as u64) as usize]),
            );
            block.push(b'\n');
        }
        block.truncate(1 << 20);
        block[(1 << 20) - 1] = b'\n';
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for _ in 0..(STREAM_BYTES >> 20) {
            file.write_all(&block)?;
        }
        file.flush()?;
        std::fs::write(&marker, b"log-like text\n")?;
    }
    time_shell(&format!("cat '{}' > /dev/null", path.display()))?;
    Ok(())
}

/// What the discard master reports to the benchmark.
enum Event {
    Started(u32),
    Completed(Completed),
}

struct Completed {
    at: Instant,
    bytes: u64,
    hwm_kib: u64,
    /// CPU time the wrapper had used (user + system).
    cpu: Duration,
}

/// A WebSocket server that acks every wrapper message immediately and discards the output.
struct DiscardMaster {
    port: u16,
    events: mpsc::Receiver<Event>,
}

impl DiscardMaster {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &tx);
                });
            }
        });
        Ok(Self { port, events })
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn wait_start(&self, limit: Duration) -> Result<u32> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .events
                .recv_timeout(left)
                .context("waiting for start")?
            {
                Event::Started(pid) => return Ok(pid),
                Event::Completed(_) => {}
            }
        }
    }

    fn wait_complete(&self, limit: Duration) -> Result<Completed> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .events
                .recv_timeout(left)
                .context("waiting for complete")?
            {
                Event::Completed(c) => return Ok(c),
                Event::Started(_) => {}
            }
        }
    }
}

/// Serves one wrapper connection until it closes.
fn serve(stream: TcpStream, events: &mpsc::Sender<Event>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::with_capacity(1 << 20, stream);
    handshake(&mut input, &mut out)?;
    let mut wrapper_pid = 0u32;
    let mut bytes = 0u64;
    let mut message = Vec::new();
    let mut buf = Vec::new();
    loop {
        let (fin, opcode, len) = read_frame(&mut input, &mut buf)?;
        let frame = &buf[..len];
        match opcode {
            0x8 => return Ok(()),
            0x9 => {
                write_frame(&mut out, 0xA, frame)?;
                continue;
            }
            0xA => continue,
            _ => {}
        }
        // Fragmented messages are reassembled; whole ones (the usual case) are used in place.
        let text: &[u8] = if fin && message.is_empty() {
            frame
        } else {
            message.extend_from_slice(frame);
            if !fin {
                continue;
            }
            &message
        };
        let kind = message_type(text);
        match kind {
            "connect" => {
                wrapper_pid = number_after(text, b"\"wrapper_pid\":").unwrap_or(0) as u32;
                write_frame(
                    &mut out,
                    0x1,
                    br#"{"type":"ack","ack_type":"connect","last_seq":-1}"#,
                )?;
            }
            "start" => {
                write_frame(&mut out, 0x1, br#"{"type":"ack","ack_type":"start"}"#)?;
                let _ = events.send(Event::Started(wrapper_pid));
            }
            "output" => {
                bytes += text.len() as u64;
                let seq = number_after(text, b"\"seq\":").context("output without seq")?;
                let ack = format!(r#"{{"type":"ack","ack_type":"output","seq":{seq}}}"#);
                write_frame(&mut out, 0x1, ack.as_bytes())?;
            }
            "complete" => {
                let at = Instant::now();
                // Read the peak before acking: the wrapper exits right after the ack.
                let hwm_kib = vm_kib(wrapper_pid, "VmHWM").unwrap_or(0);
                let cpu = cpu_time(wrapper_pid).unwrap_or_default();
                write_frame(&mut out, 0x1, br#"{"type":"ack","ack_type":"complete"}"#)?;
                let _ = events.send(Event::Completed(Completed {
                    at,
                    bytes,
                    hwm_kib,
                    cpu,
                }));
            }
            _ => {}
        }
        message.clear();
    }
}

/// The `type` of a wrapper message: our wrapper always puts the tag first.
fn message_type(text: &[u8]) -> &str {
    let Some(rest) = text.strip_prefix(b"{\"type\":\"") else {
        return "";
    };
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(0);
    std::str::from_utf8(&rest[..end]).unwrap_or("")
}

/// The integer after the last occurrence of `key`. Inside JSON strings quotes are escaped,
/// so a key spelled with bare quotes can only be a real key.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).rposition(|w| w == key)? + key.len();
    let digits: Vec<u8> = text[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Answers the HTTP upgrade (RFC 6455 §4.2.2).
fn handshake(input: &mut BufReader<TcpStream>, out: &mut TcpStream) -> Result<()> {
    let mut key = None;
    loop {
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            bail!("connection closed during the handshake");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("sec-websocket-key")
        {
            key = Some(value.trim().to_owned());
        }
    }
    let key = key.context("no Sec-WebSocket-Key")?;
    let accept = base64(&sha1(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    write!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )?;
    Ok(())
}

/// Reads one frame into `buf[..len]` (head and tail unmasked); returns (fin, opcode, len).
/// The buffer only ever grows, so large frames are not zero-filled again and again (this
/// program runs unoptimised under `cargo xtask`).
fn read_frame(input: &mut impl Read, buf: &mut Vec<u8>) -> Result<(bool, u8, usize)> {
    let mut head = [0u8; 2];
    input.read_exact(&mut head)?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            input.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            input.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let len = usize::try_from(len)?;
    let mut mask = [0u8; 4];
    if masked {
        input.read_exact(&mut mask)?;
    }
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let payload = &mut buf[..len];
    input.read_exact(payload)?;
    if masked {
        // Only the head (the `type` tag) and the tail (`seq`) are ever looked at, so only
        // those are unmasked: the master should cost the wrapper's machine next to nothing.
        let (head, tail) = if len > 1024 {
            (512, len - 512)
        } else {
            (len, len)
        };
        for i in (0..head).chain(tail..len) {
            payload[i] ^= mask[i & 3];
        }
    }
    Ok((fin, opcode, len))
}

/// Writes one unmasked frame (servers never mask).
fn write_frame(out: &mut TcpStream, opcode: u8, payload: &[u8]) -> Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    out.write_all(&frame)?;
    Ok(())
}

/// SHA-1 (FIPS 180-4), only for the handshake's accept key.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, &wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let n = (u32::from(group[0]) << 16)
            | (u32::from(*group.get(1).unwrap_or(&0)) << 8)
            | u32::from(*group.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
        assert_eq!(
            base64(&sha1(key.as_bytes())),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn seq_is_read_from_the_real_key() {
        let text = br#"{"type":"output","data":"say \"seq\":7","seq":42}"#;
        assert_eq!(message_type(text), "output");
        assert_eq!(number_after(text, b"\"seq\":"), Some(42));
    }
}
