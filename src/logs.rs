//! How log lines are made and where they go.
//!
//! Where: a shared buffer that a background thread writes to stderr every [`FLUSH_EVERY`], or at
//! once for warnings and errors. Why not `tracing_appender::non_blocking`: it hands each line to
//! its writer thread through a channel, so under load every request log line costs a thread
//! wake-up and a write(2) of its own. Measured with strace on this proxy: one `write`, one
//! `sched_yield` and a futex call per request, on cores the proxy shares with its clients. Here a
//! line is a copy into a buffer under an uncontended lock; the thread writes many lines at once.
//!
//! How: [`Plain`], the human format without colours, writes the same lines as tracing-subscriber's
//! default format at a fraction of its cost (measured with callgrind: the default format took a
//! quarter of all the instructions spent on a proxied request, most of it in colour handling that
//! produces nothing when colours are off, and in formatting the timestamp).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// How long an `info` line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Past this many buffered bytes (stderr blocked, say) new lines are dropped and counted, so a
/// stuck journal cannot grow the proxy's memory without bound.
const MAX_BUFFERED: usize = 8 * 1024 * 1024;
/// Past this many the writer thread is woken early.
const WAKE_AT: usize = 256 * 1024;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: u64,
    urgent: bool,
    closed: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
}

/// The `MakeWriter` for the tracing subscriber. Cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is buffered and stops the writer thread when dropped (at the end of `main`).
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A writer thread that writes to `out`, and the `MakeWriter` that feeds it.
pub fn start<W: Write + Send + 'static>(out: W) -> (BatchWriter, Guard) {
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Buffer::default()),
        wake: Condvar::new(),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("credproxy-log".into())
        .spawn(move || write_loop(&worker, out))
        .ok();
    (
        BatchWriter {
            shared: shared.clone(),
        },
        Guard { shared, thread },
    )
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let (closed, dropped) = {
            let Ok(mut buf) = shared.buffer.lock() else {
                return;
            };
            if !buf.closed && !buf.urgent && buf.bytes.len() < WAKE_AT {
                buf = match shared.wake.wait_timeout(buf, FLUSH_EVERY) {
                    Ok((b, _)) => b,
                    Err(_) => return,
                };
            }
            buf.urgent = false;
            std::mem::swap(&mut buf.bytes, &mut spare);
            (buf.closed, std::mem::take(&mut buf.dropped))
        };
        if dropped > 0 {
            let _ = writeln!(
                out,
                "credproxy: {dropped} log line(s) dropped: stderr was not taking them"
            );
        }
        // A failed write (stderr closed) cannot be reported anywhere: the lines are let go.
        let _ = out.write_all(&spare);
        let _ = out.flush();
        spare.clear();
        if closed {
            return;
        }
    }
}

impl BatchWriter {
    fn push(&self, line: &[u8], urgent: bool) {
        let Ok(mut buf) = self.shared.buffer.lock() else {
            return;
        };
        if buf.bytes.len() + line.len() > MAX_BUFFERED {
            buf.dropped += 1;
            return;
        }
        buf.bytes.extend_from_slice(line);
        if urgent || buf.bytes.len() >= WAKE_AT {
            buf.urgent = true;
            drop(buf);
            self.shared.wake.notify_one();
        }
    }
}

/// One event's line. tracing-subscriber formats an event into a buffer of its own and writes
/// it here whole, in one `write`: that goes straight into the shared buffer. Anything written in
/// pieces is collected and handed on when this is dropped, so a line is never split.
pub struct Line<'a> {
    writer: &'a BatchWriter,
    urgent: bool,
    bytes: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.is_empty() && buf.ends_with(b"\n") {
            self.writer.push(buf, self.urgent);
        } else {
            self.bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if !self.bytes.is_empty() {
            self.writer.push(&self.bytes, self.urgent);
        }
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            writer: self,
            urgent: true,
            bytes: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line<'a> {
        Line {
            writer: self,
            // Warnings and errors go out at once; info and below may wait for the next flush.
            urgent: *meta.level() <= tracing::Level::WARN,
            bytes: Vec::new(),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut buf) = self.shared.buffer.lock() {
            buf.closed = true;
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// The line being formatted (see `Plain`), kept to save an allocation per line.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `2026-11-23T16:19:29.895377Z  INFO credproxy::forward: request request_id=1 host=…`: the
/// default format of tracing-subscriber without colours, made cheaply. (credproxy opens no spans,
/// so there is no span context to print.)
#[derive(Default)]
pub struct Plain {
    /// Each line starts with its syslog priority (`<3>` for an error … `<7>` for debug), which
    /// journald takes off and keeps as the entry's priority: `journalctl -p warning` then works.
    pub journal: bool,
}

impl Plain {
    /// For stderr as it is now: to the journal when it is the stream systemd's `JOURNAL_STREAM`
    /// names (its device and inode), which a pipe or file that stderr was redirected to is not.
    pub fn for_stderr() -> Plain {
        Plain {
            journal: stderr_is_the_journal(),
        }
    }
}

#[cfg(unix)]
pub fn stderr_is_the_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream
        .to_str()
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

#[cfg(not(unix))]
pub fn stderr_is_the_journal() -> bool {
    false
}

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // The line is built in a String of this thread's and handed to `writer` once: every
        // write through `writer` is a dynamic call, and a line is some sixty of them.
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                let written = format_line(&mut line, event, self.journal)
                    .and_then(|()| writer.write_str(&line));
                // One outsized line (a long error chain, say) must not pin its size forever.
                if line.capacity() > 64 * 1024 {
                    *line = String::new();
                }
                written
            }
            // A value's `Display` that logs: that inner event gets a String of its own.
            Err(_) => {
                let mut line = String::new();
                format_line(&mut line, event, self.journal)?;
                writer.write_str(&line)
            }
        })
    }
}

/// A value whose `Display` or `Debug` fails fails the line, as in the default format (which then
/// writes its "Unable to format" notice instead).
fn format_line(line: &mut String, event: &Event<'_>, journal: bool) -> std::fmt::Result {
    let meta = event.metadata();
    let priority = match *meta.level() {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        tracing::Level::DEBUG | tracing::Level::TRACE => "<7>",
    };
    if journal {
        line.push_str(priority);
    }
    write_timestamp(line);
    // ` {:>5} {}: ` without `core::fmt`: the five levels, padded as the default format does.
    line.push_str(match *meta.level() {
        tracing::Level::ERROR => " ERROR ",
        tracing::Level::WARN => "  WARN ",
        tracing::Level::INFO => "  INFO ",
        tracing::Level::DEBUG => " DEBUG ",
        tracing::Level::TRACE => " TRACE ",
    });
    line.push_str(meta.target());
    line.push_str(": ");
    let mut fields = Fields {
        line,
        first: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    if journal && fields.line.contains('\n') {
        // A message of several lines (a refused reload and its problems): the journal takes each
        // line as an entry of its own, so each needs the priority.
        *fields.line = fields.line.replace('\n', &format!("\n{priority}"));
    }
    fields.line.push('\n');
    Ok(())
}

/// RFC 3339 in UTC with microseconds. The date and time of day are made once per second.
fn write_timestamp(line: &mut String) {
    use std::cell::RefCell;
    use std::fmt::Write as _;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let t = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            cached.1.clear();
            let _ = write!(
                cached.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            cached.0 = secs;
        }
        line.push_str(&cached.1);
    });
    line.push_str(std::str::from_utf8(&fraction(now.subsec_micros())).unwrap_or(".000000Z"));
}

/// `.{:06}Z` without `core::fmt`: microseconds (below 1,000,000), zero-padded.
fn fraction(micros: u32) -> [u8; 8] {
    let mut out = *b".000000Z";
    let mut n = itoa::Buffer::new();
    let digits = n.format(micros.min(999_999)).as_bytes();
    out[7 - digits.len()..7].copy_from_slice(digits);
    out
}

/// A socket address written as `Display` writes it, without `core::fmt`'s per-octet padding
/// machinery for IPv4 (the peer of every request line).
pub struct Addr(pub std::net::SocketAddr);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            std::net::SocketAddr::V4(a) => {
                let mut n = itoa::Buffer::new();
                for (i, octet) in a.ip().octets().iter().enumerate() {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(n.format(*octet))?;
                }
                f.write_str(":")?;
                f.write_str(n.format(a.port()))
            }
            v6 => std::fmt::Display::fmt(&v6, f),
        }
    }
}

/// Writes an event's fields as the default format does: the message bare, then ` name=value`,
/// strings quoted.
struct Fields<'a> {
    line: &'a mut String,
    first: bool,
    /// The first value that failed to format.
    result: std::fmt::Result,
}

impl Fields<'_> {
    /// ` name=` (no space before the first field; the message is written bare), for the value
    /// the caller writes next.
    fn name(&mut self, field: &Field) -> &mut String {
        if !self.first {
            self.line.push(' ');
        }
        self.first = false;
        let name = field.name();
        if name != "message" {
            self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.line.push('=');
        }
        self.line
    }
}

/// `value:?` for a string: quoted, escaped as `Debug` escapes it. Most logged strings (hosts,
/// route and provider names) need no escaping, and those are written without `core::fmt`.
/// (Cannot fail: `str`'s `Debug` into a `String` does not.)
fn write_quoted(line: &mut String, value: &str) {
    use std::fmt::Write as _;
    let plain = value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    if plain {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        let _ = write!(line, "{value:?}");
    }
}

/// Escapes, in what was written from `start` on, the characters a logged value could use to drive
/// the terminal an operator reads the log in, or to forge a line: C0 controls (but tab, and
/// newline when `newlines`, which only the message may carry), DEL and C1, as `\x1b` and
/// `\u{9b}`. The default format escapes ESC, BEL, BS, FF, DEL and C1 in the message and errors;
/// here every value gets it, since a log file is where such bytes would wait for a terminal.
fn escape_controls(line: &mut String, start: usize, newlines: bool) {
    use std::fmt::Write as _;
    // 0xc2 leads every C1 character's UTF-8 (and some printable ones: those are kept below).
    let suspect = |b: &u8| *b < 0x20 || *b == 0x7f || *b == 0xc2;
    if !line
        .as_bytes()
        .get(start..)
        .unwrap_or_default()
        .iter()
        .any(suspect)
    {
        return;
    }
    let tail = line.split_off(start);
    for c in tail.chars() {
        match c {
            '\t' => line.push(c),
            '\n' if newlines => line.push(c),
            '\0'..='\x1f' | '\x7f' => {
                let _ = write!(line, "\\x{:02x}", u32::from(c));
            }
            '\u{80}'..='\u{9f}' => {
                let _ = write!(line, "\\u{{{:x}}}", u32::from(c));
            }
            c => line.push(c),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let start = self.name(field).len();
            self.line.push_str(value);
            escape_controls(self.line, start, true);
        } else {
            // Quoted as `Debug` quotes it, which escapes every control character already.
            write_quoted(self.name(field), value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field)
            .push_str(if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        use std::fmt::Write as _;
        let start = self.name(field).len();
        let written = write!(self.line, "{value}");
        escape_controls(self.line, start, false);
        self.result = self.result.and(written);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let start = self.name(field).len();
        let written = write!(self.line, "{value:?}");
        escape_controls(self.line, start, field.name() == "message");
        self.result = self.result.and(written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_all_are_written_at_exit() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone());
        for i in 0..1000 {
            let mut line = writer.make_writer();
            line.urgent = false;
            write!(line, "line {i} ").unwrap_or_default();
            writeln!(line, "end").unwrap_or_default();
        }
        drop(guard);
        let out = text(&sink);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1000);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, format!("line {i} end"));
        }
    }

    #[test]
    fn events_from_many_threads_arrive_as_whole_lines() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer)
            .event_format(Plain::default())
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let dispatch = dispatch.clone();
                std::thread::spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        for i in 0..500u64 {
                            tracing::info!(t, i, pad = "x".repeat(100), "event");
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap_or_default();
        }
        drop(guard);
        let out = text(&sink);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2000);
        let mut seen = std::collections::HashSet::new();
        for l in &lines {
            let fields = l.split_once(": event ").map(|(_, f)| f).unwrap_or_default();
            assert!(
                fields.ends_with(&format!("pad=\"{}\"", "x".repeat(100))),
                "{l}"
            );
            assert!(seen.insert(fields.split(" pad=").next().unwrap_or_default().to_string()));
        }
    }

    #[test]
    fn a_warning_is_written_without_waiting_for_exit() {
        let sink = Sink::default();
        let (writer, _guard) = start(sink.clone());
        let mut line = writer.make_writer();
        writeln!(line, "something is wrong").unwrap_or_default();
        drop(line);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !text(&sink).contains("something is wrong") {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stuck_output_drops_lines_past_the_bound_and_says_how_many() {
        // The writer thread is blocked until `gate` opens, like a journal that stopped reading.
        struct Gated(Sink, Arc<(Mutex<bool>, Condvar)>);
        impl Write for Gated {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (lock, cv) = &*self.1;
                let mut open = lock.lock().map_err(|_| std::io::ErrorKind::Other)?;
                while !*open {
                    open = cv.wait(open).map_err(|_| std::io::ErrorKind::Other)?;
                }
                self.0.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (writer, guard) = start(Gated(sink.clone(), gate.clone()));
        // First, one urgent line the thread takes and blocks on.
        writeln!(writer.make_writer(), "first").unwrap_or_default();
        std::thread::sleep(Duration::from_millis(200));
        let line = vec![b'x'; 1023];
        let n = MAX_BUFFERED / 1024 + 100;
        for _ in 0..n {
            let mut l = writer.make_writer();
            l.urgent = false;
            l.write_all(&line).unwrap_or_default();
            l.write_all(b"\n").unwrap_or_default();
        }
        {
            let (lock, cv) = &*gate;
            if let Ok(mut open) = lock.lock() {
                *open = true;
            }
            cv.notify_all();
        }
        drop(guard);
        let out = text(&sink);
        let kept = out.lines().filter(|l| l.starts_with('x')).count();
        assert!(
            kept >= MAX_BUFFERED / 1024 - 1 && kept < n,
            "kept {kept} of {n}"
        );
        assert!(
            out.contains(&format!("{} log line(s) dropped", n - kept)),
            "no drop notice in the output"
        );
    }

    /// A `MakeWriter` into a shared string, for comparing formats.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            Sink(self.0.clone())
        }
    }

    /// What `emit` logs (any level), formatted by `Plain` when `plain`, else by
    /// tracing-subscriber's default format, both without colours.
    fn logged(plain: bool, emit: impl Fn()) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(out.clone());
        if plain {
            tracing::subscriber::with_default(
                builder.event_format(Plain::default()).finish(),
                emit,
            );
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        text(&Sink(out.0))
    }

    fn emit_all() {
        let peer: std::net::SocketAddr =
            "127.0.0.1:5000".parse().unwrap_or(([0, 0, 0, 0], 0).into());
        tracing::info!(
            request_id = 7u64,
            provider = "p-1",
            retried = false,
            response_bytes = Some(30u64),
            %peer,
            method = %http::Method::GET,
            host = %"api.example.com",
            route = "r \"quoted\"",
            path = "/caf\u{e9}\ttab",
            provider_id = u64::MAX,
            latency_ms = 3u64,
            "request"
        );
        tracing::warn!(
            delta = -4i64,
            min = i64::MIN,
            ok = true,
            "a warning with {} args",
            2
        );
        tracing::error!("no fields");
        tracing::info!(r#type = "raw", "raw identifier");
        tracing::debug!(peer = %Addr(([10, 0, 255, 1], 65535).into()), "debug");
        tracing::trace!(peer = %Addr("[::1]:8080".parse().unwrap_or(peer)), "trace");
        // Terminal control in the message and in an error: both formats escape it.
        tracing::info!(
            "title \x1b]0;pwned\x07 bell\x08\x0c\x7f and \u{9b}31m C1, caf\u{e9} \u{a3}5 kept"
        );
        let e = std::io::Error::other("disk \x1b[2J cleared");
        tracing::warn!(error = &e as &(dyn std::error::Error + 'static), "failed");
    }

    #[test]
    fn plain_escapes_control_characters_in_every_value_so_a_value_cannot_forge_a_line() {
        let text = logged(true, || {
            tracing::info!(
                host = %"evil\x1b[2J",
                path = %"/a\rb\nFAKE  INFO forged",
                note = ?"quoted\x1b",
                "first line\nsecond line \x1b[31m"
            );
        });
        assert!(
            !text.bytes().any(|b| (b < 0x20 && b != b'\n') || b == 0x7f),
            "raw control byte in {text:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(lines[0].ends_with(": first line"), "{text:?}");
        assert_eq!(
            lines[1],
            "second line \\x1b[31m host=evil\\x1b[2J path=/a\\x0db\\x0aFAKE  INFO forged note=\"quoted\\u{1b}\""
        );
    }

    #[test]
    fn an_event_logged_while_a_line_is_being_built_gets_a_whole_line_of_its_own() {
        let text = logged(true, || {
            tracing::info!(n = 1u64, "first");
            // As when a field's `Display` logs in the middle of another line.
            LINE.with(|line| {
                let _busy = line.borrow_mut();
                tracing::info!(n = 2u64, "second");
            });
            tracing::info!(n = 3u64, "third");
        });
        let ends: Vec<&str> = text.lines().map(|l| l.get(27..).unwrap_or(l)).collect();
        assert_eq!(
            ends,
            [
                "  INFO credproxy::logs::tests: first n=1",
                "  INFO credproxy::logs::tests: second n=2",
                "  INFO credproxy::logs::tests: third n=3",
            ]
        );
    }

    #[test]
    fn a_value_that_fails_to_format_fails_the_line_as_in_the_default_format() {
        struct Failing;
        impl std::fmt::Display for Failing {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("part")?;
                Err(std::fmt::Error)
            }
        }
        fn emit() {
            tracing::info!(bad = %Failing, after = 1u64, "msg");
            tracing::info!(fine = 2u64, "next");
        }
        let (ours, theirs) = (logged(true, emit), logged(false, emit));
        // The failed event is replaced by the default format's notice; the next line is whole.
        let first = |t: &str| t.lines().next().unwrap_or_default().to_string();
        assert_eq!(first(&ours), first(&theirs));
        assert!(first(&ours).starts_with("Unable to format"), "{ours}");
        assert!(ours.ends_with(": next fine=2\n"), "{ours}");
        assert!(!ours.contains("bad=part"), "{ours}");
    }

    #[test]
    fn addr_and_fraction_write_what_core_fmt_writes() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:5000",
            "255.255.255.255:65535",
            "[::1]:443",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap_or(([0, 0, 0, 0], 0).into());
            assert_eq!(Addr(a).to_string(), a.to_string());
        }
        for us in [0, 7, 99, 100_000, 123_456, 999_999] {
            assert_eq!(fraction(us).as_slice(), format!(".{us:06}Z").as_bytes());
        }
    }

    #[test]
    fn plain_writes_what_the_default_format_writes_without_colours() {
        let lines = |text: String| -> Vec<String> { text.lines().map(str::to_string).collect() };
        let (ours, theirs) = (
            lines(logged(true, emit_all)),
            lines(logged(false, emit_all)),
        );
        assert_eq!(ours.len(), 8, "{ours:?}");
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            // The timestamps differ by when each ran; the shape and everything after must match.
            let (ts_a, rest_a) = a.split_at(27);
            let (ts_b, rest_b) = b.split_at(27);
            assert_eq!(rest_a, rest_b);
            for ts in [ts_a, ts_b] {
                assert!(
                    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                        .is_ok(),
                    "timestamp `{ts}`"
                );
            }
        }
        assert!(
            ours[0].contains(" INFO credproxy::logs::tests: request request_id=7 provider=\"p-1\"")
        );
    }
}
