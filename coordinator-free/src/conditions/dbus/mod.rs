//! A small D-Bus client: one connection to the system bus, kept open, over which the probe
//! asks logind for its idle hint. No child processes (the probe reads twice a second) and no
//! new dependency: only what that needs is here, method calls with string arguments and
//! replies holding one basic value or a variant of one. [`wire`] lays out and reads the
//! messages; this module connects, authenticates and waits for replies, each call with a
//! deadline.

mod wire;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use wire::Value;
use wire::{CallSpec, MAX_MESSAGE, Message, message_len, method_call, parse};

/// Where the system bus listens unless `DBUS_SYSTEM_BUS_ADDRESS` says otherwise.
pub const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// Longest a call (or connecting and authenticating) may take: a stuck bus must not stall the
/// readings for longer.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Longest line of the authentication exchange (`OK` and a 32-digit guid is 37 bytes).
const MAX_LINE: usize = 256;
/// Most other messages (signals such as `NameAcquired`) passed over while waiting for a reply.
const MAX_SKIPPED: usize = 64;

const BUS_NAME: &str = "org.freedesktop.DBus";
const BUS_PATH: &str = "/org/freedesktop/DBus";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// Why a call over the bus gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("a bus address or socket path this client cannot use (only unix:path= is read)")]
    Address,
    #[error("bus i/o: {0}")]
    Io(#[from] io::Error),
    #[error("no answer from the bus within {0:?}")]
    TimedOut(Duration),
    #[error("the bus refused authentication")]
    Refused,
    #[error("a malformed message from the bus: {0}")]
    Malformed(&'static str),
    #[error("a message of {len} bytes, over the {MAX_MESSAGE}-byte limit")]
    TooLarge { len: u64 },
    #[error("more than {MAX_SKIPPED} other messages before the reply")]
    Flooded,
    #[error("a call that cannot be sent: {0}")]
    Unencodable(&'static str),
    #[error("the call failed: {name}")]
    Failed { name: String },
    #[error("a reply of another type than asked for")]
    UnexpectedReply,
}

impl BusError {
    /// Whether the connection is still in step after this error: the bus answered the call,
    /// only not with a value that was asked for.
    pub fn keeps_connection(&self) -> bool {
        matches!(self, BusError::Failed { .. } | BusError::UnexpectedReply)
    }
}

/// An authenticated connection to a bus, with the unique name `Hello` gave it.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Serial of the last call sent; replies name it.
    serial: u32,
    unique_name: String,
    timeout: Duration,
}

impl Connection {
    /// The bus listening at `socket`: connects, authenticates as this process's user and
    /// says `Hello`.
    pub fn open(socket: &Path) -> Result<Self, BusError> {
        let deadline = Instant::now() + TIMEOUT;
        let stream = connect(socket)?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut bus = Self {
            stream,
            serial: 0,
            unique_name: String::new(),
            timeout: TIMEOUT,
        };
        bus.authenticate(deadline)?;
        match bus.call(BUS_NAME, BUS_PATH, BUS_NAME, "Hello", &[])? {
            Some(Value::Str(name)) => bus.unique_name = name,
            _ => return Err(BusError::UnexpectedReply),
        }
        let name = &bus.unique_name;
        tracing::debug!(socket = %socket.display(), %name, "connected to the bus");
        Ok(bus)
    }

    /// A property of an object, by `org.freedesktop.DBus.Properties.Get`.
    pub fn property(
        &mut self,
        destination: &str,
        path: &str,
        interface: &str,
        name: &str,
    ) -> Result<Value, BusError> {
        self.call(destination, path, PROPERTIES, "Get", &[interface, name])?
            .ok_or(BusError::UnexpectedReply)
    }

    /// Calls a method with string arguments and waits for its reply: its one value, or `None`
    /// for an empty reply. Messages that are not the reply are passed over.
    pub fn call(
        &mut self,
        destination: &str,
        path: &str,
        interface: &str,
        member: &str,
        args: &[&str],
    ) -> Result<Option<Value>, BusError> {
        self.serial = self.serial.checked_add(1).unwrap_or(1);
        let serial = self.serial;
        let call = CallSpec {
            destination,
            path,
            interface,
            member,
            args,
        };
        self.stream.write_all(&method_call(serial, &call)?)?;
        let deadline = Instant::now() + self.timeout;
        for _ in 0..MAX_SKIPPED {
            let message = self.receive(deadline)?;
            if let Some(answer) = message.answer_to(serial) {
                return answer;
            }
        }
        Err(BusError::Flooded)
    }

    /// `AUTH EXTERNAL` as this process's effective user, then `BEGIN`.
    fn authenticate(&mut self, deadline: Instant) -> Result<(), BusError> {
        // SAFETY: geteuid takes nothing and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let hex: String = uid
            .to_string()
            .bytes()
            .map(|digit| format!("{digit:02x}"))
            .collect();
        // The leading NUL byte is where a bus may pass credentials along the socket.
        self.stream
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())?;
        let mut line = [0u8; MAX_LINE];
        let mut filled = 0;
        let end = loop {
            if let Some(end) = line[..filled].windows(2).position(|w| w == b"\r\n") {
                break end;
            }
            if filled == line.len() {
                return Err(BusError::Malformed("an authentication line too long"));
            }
            filled += self.read_some(&mut line[filled..], deadline)?;
        };
        // The bus says nothing more until it hears BEGIN.
        if end + 2 != filled {
            return Err(BusError::Malformed("more after the authentication reply"));
        }
        if !line[..end].starts_with(b"OK ") {
            return Err(BusError::Refused);
        }
        self.stream.write_all(b"BEGIN\r\n")?;
        Ok(())
    }

    /// The next whole message, read by its length; an oversized one is refused from its
    /// first 16 bytes.
    fn receive(&mut self, deadline: Instant) -> Result<Message, BusError> {
        let mut prefix = [0u8; 16];
        self.read_exactly(&mut prefix, deadline)?;
        let len = message_len(&prefix)?;
        let mut bytes = vec![0u8; len];
        bytes[..16].copy_from_slice(&prefix);
        self.read_exactly(&mut bytes[16..], deadline)?;
        parse(&bytes)
    }

    fn read_exactly(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), BusError> {
        let mut filled = 0;
        while filled < buf.len() {
            filled += self.read_some(&mut buf[filled..], deadline)?;
        }
        Ok(())
    }

    /// One read of at least a byte, waiting no later than `deadline`.
    fn read_some(&mut self, buf: &mut [u8], deadline: Instant) -> Result<usize, BusError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BusError::TimedOut(self.timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(buf) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(BusError::TimedOut(self.timeout));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Connects without waiting: a bus too stuck to accept (its listen queue full) is refused at
/// once instead of blocking the reading, as a plain blocking connect would.
#[cfg(target_os = "linux")]
fn connect(path: &Path) -> Result<UnixStream, BusError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The path and its terminating NUL must fit.
    if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(BusError::Address);
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` was just returned by socket and nothing else holds it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `address` is an initialised sockaddr_un and `len` lies within it.
    let connected = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            len as libc::socklen_t,
        )
    };
    if connected != 0 {
        return Err(io::Error::last_os_error().into());
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Elsewhere (where the probe reads little anyway) a plain connect.
#[cfg(not(target_os = "linux"))]
fn connect(path: &Path) -> Result<UnixStream, BusError> {
    Ok(UnixStream::connect(path)?)
}

/// The socket of the first `unix:path=` entry in a bus address (`None` for other transports),
/// or [`SYSTEM_BUS`] when no address is set.
pub fn system_bus_path(address: Option<&str>) -> Option<PathBuf> {
    let Some(address) = address else {
        return Some(PathBuf::from(SYSTEM_BUS));
    };
    address.split(';').find_map(|entry| {
        let keys = entry.strip_prefix("unix:")?;
        let value = keys.split(',').find_map(|kv| kv.strip_prefix("path="))?;
        unescape(value).map(|bytes| PathBuf::from(OsString::from_vec(bytes)))
    })
}

/// An address value with its `%xx` escapes decoded; `None` if one is broken.
fn unescape(value: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::wire::METHOD_CALL;
    pub(crate) use super::wire::tests::{g, s};
    use super::wire::tests::{name_acquired, reply, u};
    use super::*;

    #[test]
    fn bus_addresses_name_a_unix_socket_or_none() {
        assert_eq!(system_bus_path(None), Some(PathBuf::from(SYSTEM_BUS)));
        assert_eq!(
            system_bus_path(Some("unix:path=/run/bus")),
            Some(PathBuf::from("/run/bus"))
        );
        assert_eq!(
            system_bus_path(Some(
                "tcp:host=x,port=1;unix:guid=00,path=/a%20b%2c;unix:path=/c"
            )),
            Some(PathBuf::from("/a b,"))
        );
        assert_eq!(system_bus_path(Some("unix:abstract=/tmp/x")), None);
        assert_eq!(system_bus_path(Some("tcp:host=localhost,port=4")), None);
        assert_eq!(system_bus_path(Some("unix:path=/bad%zz")), None);
        assert_eq!(system_bus_path(Some("")), None);
    }

    /// A bus of one connection at `socket`: it lets the client in, answers `Hello`, then
    /// answers each call with the next of `replies` (a signature and a body). Returns the
    /// calls it read.
    pub(crate) fn fake_bus(
        socket: &Path,
        replies: Vec<(&'static str, Vec<u8>)>,
    ) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind");
        std::thread::spawn(move || {
            let (mut client, _) = listener.accept().expect("accept");
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                let mut byte = [0u8];
                client.read_exact(&mut byte).expect("auth line");
                line.push(byte[0]);
            }
            assert!(line.starts_with(b"\0AUTH EXTERNAL "), "{line:?}");
            client
                .write_all(b"OK 0123456789abcdef0123456789abcdef\r\n")
                .expect("write");
            let mut begin = [0u8; 7];
            client.read_exact(&mut begin).expect("BEGIN");
            assert_eq!(&begin, b"BEGIN\r\n");
            let hello = ("s", s(":1.7"));
            let mut calls = Vec::new();
            for (signature, body) in std::iter::once(hello).chain(replies) {
                let mut prefix = [0u8; 16];
                client.read_exact(&mut prefix).expect("a call");
                let mut call = vec![0u8; message_len(&prefix).expect("length")];
                call[..16].copy_from_slice(&prefix);
                client.read_exact(&mut call[16..]).expect("a call");
                let serial = u32::from_le_bytes(call[8..12].try_into().expect("4"));
                client
                    .write_all(&reply(serial, signature, &body))
                    .expect("reply");
                calls.push(call);
            }
            calls
        })
    }

    /// A connection over one end of a socket pair, its authentication already done.
    fn paired(timeout: Duration) -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        ours.set_write_timeout(Some(timeout)).expect("timeout");
        let bus = Connection {
            stream: ours,
            serial: 0,
            unique_name: ":1.42".into(),
            timeout,
        };
        (bus, theirs)
    }

    #[test]
    fn signals_before_the_reply_are_passed_over() {
        let (mut bus, mut peer) = paired(Duration::from_secs(5));
        peer.write_all(&name_acquired()).expect("write");
        peer.write_all(&reply(1, "v", &[1, b'b', 0, 0, 0, 0, 0, 0]))
            .expect("write");
        let hint = bus.property("org.freedesktop.login1", "/", "m", "IdleHint");
        assert_eq!(hint.expect("answered"), Value::Bool(false));
        // What went out is a call with serial 1.
        let mut prefix = [0u8; 16];
        peer.read_exact(&mut prefix).expect("read");
        let mut call = vec![0u8; message_len(&prefix).expect("length")];
        call[..16].copy_from_slice(&prefix);
        peer.read_exact(&mut call[16..]).expect("read");
        assert_eq!(parse(&call).expect("parses").kind, METHOD_CALL);
        assert_eq!(&call[8..12], &1u32.to_le_bytes());
    }

    #[test]
    fn a_silent_flooding_or_oversized_bus_ends_the_call() {
        let started = Instant::now();
        let (mut bus, _peer) = paired(Duration::from_millis(200));
        assert!(matches!(
            bus.call("a.b", "/", "a.b", "M", &[]),
            Err(BusError::TimedOut(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));

        let (mut bus, mut peer) = paired(Duration::from_secs(5));
        for _ in 0..MAX_SKIPPED {
            peer.write_all(&name_acquired()).expect("write");
        }
        assert!(matches!(
            bus.call("a.b", "/", "a.b", "M", &[]),
            Err(BusError::Flooded)
        ));

        let (mut bus, mut peer) = paired(Duration::from_secs(5));
        let mut huge = reply(1, "u", &u(1));
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        peer.write_all(&huge).expect("write");
        assert!(matches!(
            bus.call("a.b", "/", "a.b", "M", &[]),
            Err(BusError::TooLarge { .. })
        ));

        let (mut bus, peer) = paired(Duration::from_secs(5));
        drop(peer);
        assert!(bus.call("a.b", "/", "a.b", "M", &[]).is_err());
    }

    /// A private bus of a real `dbus-daemon`, stopped when dropped.
    pub(crate) struct Daemon {
        child: std::process::Child,
        pub(crate) socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Daemon {
        pub(crate) fn start() -> Option<Self> {
            use std::io::BufRead;
            let dir = tempfile::tempdir().expect("dir");
            let socket = dir.path().join("bus");
            let spawned = std::process::Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--print-address"])
                .arg(format!("--address=unix:path={}", socket.display()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
                Err(e) => panic!("dbus-daemon does not start: {e}"),
            };
            // It prints its address once it listens.
            let stdout = child.stdout.take().expect("stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = io::BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let daemon = Self {
                child,
                socket,
                _dir: dir,
            };
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("dbus-daemon says where it listens");
            assert!(line.starts_with("unix:path="), "{line}");
            Some(daemon)
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn a_real_bus_knows_who_we_are_and_answers_for_absent_services() {
        let Some(daemon) = Daemon::start() else {
            assert!(
                std::env::var_os("CF_REQUIRE_DBUS").is_none(),
                "CF_REQUIRE_DBUS is set but no dbus-daemon is installed"
            );
            eprintln!("skipped: no dbus-daemon to talk to (apt-get install dbus)");
            return;
        };
        let mut bus = Connection::open(&daemon.socket).expect("connects and says Hello");
        assert!(bus.unique_name.starts_with(':'), "{}", bus.unique_name);
        let name = bus.unique_name.clone();
        let uid = bus
            .call(
                BUS_NAME,
                BUS_PATH,
                BUS_NAME,
                "GetConnectionUnixUser",
                &[&name],
            )
            .expect("answered");
        // SAFETY: geteuid takes nothing and cannot fail.
        assert_eq!(uid, Some(Value::U32(unsafe { libc::geteuid() })));

        let started = Instant::now();
        match bus.property(
            "org.example.Absent",
            "/org/example/Absent",
            "org.example.Absent",
            "IdleHint",
        ) {
            Err(BusError::Failed { name }) => {
                // Not started on demand: the calls ask the bus not to.
                assert_eq!(name, "org.freedesktop.DBus.Error.NameHasNoOwner");
            }
            other => panic!("an error reply, not {other:?}"),
        }
        assert!(started.elapsed() < TIMEOUT);
        // The connection stays in step after an error: the bus answers again.
        let again = bus.call(BUS_NAME, BUS_PATH, BUS_NAME, "GetId", &[]);
        assert!(matches!(again, Ok(Some(Value::Str(id))) if id.len() == 32));

        // A socket nobody listens on fails at once.
        drop(daemon);
        assert!(Connection::open(Path::new("/nonexistent/bus")).is_err());
    }
}
