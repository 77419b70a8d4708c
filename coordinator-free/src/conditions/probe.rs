//! Readings of the machine for [`super::Gate`], on Linux: logind over D-Bus (or the input
//! devices) for idle time, `/proc` for other programs' CPU use, `/sys` for power and
//! temperature, and the C library for local time. Anything that cannot be read is `None`, never
//! a guess; on other systems every reading but the local time is `None`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dbus::{self, BusError, Connection, Value};
use super::{LocalTime, Reading};

/// Most bytes read from a `/sys` or `/proc` file.
const MAX_READ: u64 = 64 << 10;
/// Other programs' CPU use is measured over at least this long: a spike of a fraction of a
/// second is not "busy".
pub const CPU_WINDOW: Duration = Duration::from_secs(2);
/// Most input devices watched.
const MAX_DEVICES: usize = 64;

/// Where idle time comes from.
#[derive(Debug)]
pub enum IdleSource {
    /// logind's `IdleHint`/`IdleSinceHint`, which the desktop sets on Wayland and X11 alike.
    Logind(Logind),
    /// Events on `/dev/input/event*` (readable by root or the `input` group).
    InputDevices(InputWatch),
    /// The last input as the program embedding the library reports it.
    Reported(std::sync::Arc<std::sync::Mutex<Instant>>),
    Unknown,
}

impl IdleSource {
    /// The words `worker status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            IdleSource::Logind(_) => "logind",
            IdleSource::InputDevices(_) => "input devices",
            IdleSource::Reported(_) => "reported",
            IdleSource::Unknown => "unknown",
        }
    }

    /// The first source that works here.
    pub fn detect() -> Self {
        let mut logind = Logind::system();
        if logind.idle_for(SystemTime::now()).is_some() {
            return IdleSource::Logind(logind);
        }
        match InputWatch::open(Path::new("/dev/input")) {
            Some(watch) => IdleSource::InputDevices(watch),
            None => IdleSource::Unknown,
        }
    }
}

/// The machine's readings, and what a reading of CPU use needs from the one before.
#[derive(Debug)]
pub struct Probe {
    proc_root: PathBuf,
    sys_root: PathBuf,
    idle: IdleSource,
    /// This process's id: it and its children (the unit hosts) are "ours".
    pid: u32,
    last_cpu: Option<CpuSample>,
    /// Other programs' CPU use over the last window.
    cpu_percent: Option<f64>,
}

#[derive(Debug, Clone)]
struct CpuSample {
    at: Instant,
    total: u64,
    busy: u64,
    /// Our processes' CPU time by pid.
    ours: HashMap<u32, u64>,
}

impl Probe {
    /// Readings of this machine, with the idle source that works here.
    pub fn system() -> Self {
        Self::with_roots("/proc", "/sys", IdleSource::detect(), std::process::id())
    }

    /// Readings from other roots (tests use a directory that looks like `/proc` and `/sys`).
    pub fn with_roots(
        proc_root: impl Into<PathBuf>,
        sys_root: impl Into<PathBuf>,
        idle: IdleSource,
        pid: u32,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            sys_root: sys_root.into(),
            idle,
            pid,
            last_cpu: None,
            cpu_percent: None,
        }
    }

    pub fn idle_source(&self) -> &'static str {
        self.idle.name()
    }

    /// One reading, with the idle time only if `idle` (it may cost a call to logind). Blocks
    /// for as long as the system bus takes to answer (at most a few seconds): call it off the
    /// async runtime.
    pub fn read(&mut self, idle: bool) -> Reading {
        let now = SystemTime::now();
        let idle_for = match &mut self.idle {
            _ if !idle => None,
            IdleSource::Logind(logind) => logind.idle_for(now),
            IdleSource::InputDevices(watch) => Some(watch.idle_for(Instant::now())),
            IdleSource::Reported(last) => {
                let last = *last.lock().unwrap_or_else(|p| p.into_inner());
                Some(Instant::now().saturating_duration_since(last))
            }
            IdleSource::Unknown => None,
        };
        // Sampled anew only once the window has passed; in between, the last figure stands.
        let due = self
            .last_cpu
            .as_ref()
            .is_none_or(|last| last.at.elapsed() >= CPU_WINDOW);
        if due {
            let sample = self.cpu_sample();
            self.cpu_percent = match (&self.last_cpu, &sample) {
                (Some(before), Some(after)) => other_cpu_percent(before, after),
                _ => None,
            };
            self.last_cpu = sample;
        }
        let other_cpu_percent = self.cpu_percent;
        Reading {
            idle_for,
            other_cpu_percent,
            on_battery: on_battery(&self.sys_root.join("class/power_supply")),
            temperature_c: hottest_zone(&self.sys_root.join("class/thermal")),
            local_time: local_time(now),
        }
    }

    fn cpu_sample(&self) -> Option<CpuSample> {
        let stat = read_small(&self.proc_root.join("stat"))?;
        let (total, busy) = machine_cpu(&stat)?;
        let mut ours = HashMap::new();
        let entries = std::fs::read_dir(&self.proc_root).ok()?;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(stat) = read_small(&entry.path().join("stat")) else {
                continue;
            };
            if let Some((parent, cpu)) = process_cpu(&stat)
                && (pid == self.pid || parent == self.pid)
            {
                ours.insert(pid, cpu);
            }
        }
        Some(CpuSample {
            at: Instant::now(),
            total,
            busy,
            ours,
        })
    }
}

/// Other programs' share of the machine between two samples, in percent: all busy time less
/// ours. A process of ours that ended between the samples is not seen in the second one, so
/// its last moments count as other programs' (a unit host lives for many samples).
fn other_cpu_percent(before: &CpuSample, after: &CpuSample) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    let busy = after.busy.saturating_sub(before.busy);
    let ours: u64 = after
        .ours
        .iter()
        .map(|(pid, cpu)| cpu.saturating_sub(before.ours.get(pid).copied().unwrap_or(0)))
        .sum();
    Some(100.0 * busy.saturating_sub(ours).min(total) as f64 / total as f64)
}

/// `(all time, busy time)` of the machine from `/proc/stat`'s first line, in clock ticks.
fn machine_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if ticks.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
    Some((total, total.saturating_sub(idle)))
}

/// `(parent pid, user + system ticks)` from a `/proc/PID/stat` line. The command name is in
/// parentheses and may itself hold spaces and parentheses, so fields count from the last `)`.
fn process_cpu(stat: &str) -> Option<(u32, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]: ppid is field 4, utime 14, stime 15.
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

/// On battery: a battery discharging and no mains or USB supply online. A machine with no
/// power supplies listed (a desktop, a server, a virtual machine) is on mains.
fn on_battery(dir: &Path) -> Option<bool> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        // No power supply class at all: nothing that could be a battery.
        return Some(false);
    };
    let (mut discharging, mut mains) = (false, false);
    for entry in entries.flatten().take(MAX_DEVICES) {
        let path = entry.path();
        let read = |name: &str| read_small(&path.join(name)).map(|s| s.trim().to_string());
        match read("type").as_deref() {
            Some("Battery") => {
                discharging |= read("status").as_deref() == Some("Discharging");
            }
            Some("Mains" | "USB") => mains |= read("online").as_deref() == Some("1"),
            _ => {}
        }
    }
    Some(discharging && !mains)
}

/// The hottest thermal zone in °C, `None` where there are none.
fn hottest_zone(dir: &Path) -> Option<f64> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .take(MAX_DEVICES)
        .filter_map(|e| {
            read_small(&e.path().join("temp"))?
                .trim()
                .parse::<i64>()
                .ok()
        })
        // Millidegrees; a zone reporting nonsense (some read -273 °C or huge) is left out.
        .filter(|m| (-50_000..=200_000).contains(m))
        .map(|m| m as f64 / 1000.0)
        .reduce(f64::max)
}

fn read_small(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_READ)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The local day of the week and time of day, from the C library's idea of the time zone.
pub fn local_time(now: SystemTime) -> Option<LocalTime> {
    let tm = local_tm(now)?;
    // tm_wday counts from Sunday.
    let weekday = u8::try_from((tm.tm_wday + 6) % 7).ok()?;
    let minute = u16::try_from(tm.tm_hour * 60 + tm.tm_min).ok()?;
    Some(LocalTime::new(weekday, minute))
}

/// `now` broken down in local time by the C library; `None` where it cannot say.
pub(crate) fn local_tm(now: SystemTime) -> Option<libc::tm> {
    let secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let t = libc::time_t::try_from(secs).ok()?;
    // SAFETY: `tm` is a plain C struct for which all zeroes is a valid value, and
    // `localtime_r` writes only into it (the reentrant form: no shared static buffer).
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        (!libc::localtime_r(&t, &mut tm).is_null()).then_some(tm)
    }
}

/// logind's idle hint, asked over a connection to the system bus that is kept between
/// readings and made again when it fails.
#[derive(Debug)]
pub struct Logind {
    /// Where the system bus listens; `None` where its address is not one this client reads.
    socket: Option<PathBuf>,
    bus: Option<Connection>,
}

const LOGIND: &str = "org.freedesktop.login1";
const LOGIND_PATH: &str = "/org/freedesktop/login1";
const LOGIND_MANAGER: &str = "org.freedesktop.login1.Manager";

impl Logind {
    /// logind on the system bus named by `DBUS_SYSTEM_BUS_ADDRESS`, or at its usual socket.
    pub fn system() -> Self {
        let address = std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS");
        let socket = dbus::system_bus_path(address.as_ref().map(|a| a.to_str().unwrap_or("")));
        Self::at(socket)
    }

    /// logind on the bus listening at `socket`.
    pub fn at(socket: Option<PathBuf>) -> Self {
        Self { socket, bus: None }
    }

    /// How long the machine has been idle; `None` when logind cannot be asked. The manager's
    /// hint covers every session: idle only when all are (or there is none, so nobody is at the
    /// machine), and not while a program holds an idle inhibitor.
    pub fn idle_for(&mut self, now: SystemTime) -> Option<Duration> {
        let (mut bus, fresh) = match self.bus.take() {
            Some(bus) => (bus, false),
            None => (self.connect()?, true),
        };
        let mut answer = ask_logind(&mut bus, now);
        if !fresh && answer.as_ref().is_err_and(|e| !e.keeps_connection()) {
            // A connection that served before and now does not answer (the bus restarted or
            // stalled) is made again, once per reading.
            bus = self.connect()?;
            answer = ask_logind(&mut bus, now);
        }
        match answer {
            Ok(idle) => {
                self.bus = Some(bus);
                Some(idle)
            }
            Err(e) => {
                tracing::trace!(error = %e, "no idle hint from logind");
                if e.keeps_connection() {
                    self.bus = Some(bus);
                }
                None
            }
        }
    }

    fn connect(&self) -> Option<Connection> {
        Connection::open(self.socket.as_deref()?)
            .map_err(|e| tracing::trace!(error = %e, "no connection to the system bus"))
            .ok()
    }
}

/// logind's `IdleHint` and, when idle, its `IdleSinceHint`.
fn ask_logind(bus: &mut Connection, now: SystemTime) -> Result<Duration, BusError> {
    let mut property = |name| bus.property(LOGIND, LOGIND_PATH, LOGIND_MANAGER, name);
    match property("IdleHint")? {
        Value::Bool(false) => Ok(Duration::ZERO),
        Value::Bool(true) => match property("IdleSinceHint")? {
            Value::U64(micros) => Ok(idle_since(micros, now)),
            _ => Err(BusError::UnexpectedReply),
        },
        _ => Err(BusError::UnexpectedReply),
    }
}

/// Time since `IdleSinceHint`, microseconds since the Unix epoch on the realtime clock; none
/// if the clock has gone back past it.
fn idle_since(micros: u64, now: SystemTime) -> Duration {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(Duration::from_micros(micros))
}

/// Keyboard and mouse activity seen on the input devices this process may read.
#[derive(Debug)]
pub struct InputWatch {
    devices: Vec<File>,
    last_input: Instant,
}

impl InputWatch {
    /// Watches every readable `event*` device in `dir`; `None` if there is none. Until an
    /// event is seen, the machine counts as used from when the watch began.
    pub fn open(dir: &Path) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut devices = Vec::new();
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            if devices.len() >= MAX_DEVICES {
                break;
            }
            if !entry.file_name().to_string_lossy().starts_with("event") {
                continue;
            }
            if let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(entry.path())
            {
                devices.push(file);
            }
        }
        (!devices.is_empty()).then(|| Self {
            devices,
            last_input: Instant::now(),
        })
    }

    /// Drains whatever events arrived; any event is input now.
    pub fn idle_for(&mut self, now: Instant) -> Duration {
        let mut buffer = [0u8; 4096];
        for device in &mut self.devices {
            // Bounded: a device producing events faster than we read still ends the loop.
            for _ in 0..64 {
                match device.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => self.last_input = now,
                }
            }
        }
        now.saturating_duration_since(self.last_input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn machine_and_process_cpu_are_read_from_proc_lines() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(machine_cpu(stat), Some((980, 160)));
        assert_eq!(machine_cpu("intr 1 2 3"), None);
        assert_eq!(machine_cpu("cpu 1 2"), None);
        // A command name with spaces and parentheses.
        let line = "4242 (cf unit (host)) S 4000 4242 4000 0 -1 4194304 100 0 0 0 70 30 0 0 30 10 2 0 100 0 0";
        assert_eq!(process_cpu(line), Some((4000, 100)));
        assert_eq!(process_cpu("4242 (no fields)"), None);
        assert_eq!(process_cpu("no parenthesis"), None);
    }

    #[test]
    fn other_programs_cpu_is_the_machines_busy_time_less_ours() {
        let before = CpuSample {
            at: Instant::now(),
            total: 1000,
            busy: 100,
            ours: HashMap::from([(10, 50), (11, 0)]),
        };
        let after = CpuSample {
            at: Instant::now(),
            total: 2000,
            busy: 900,
            // 11 used 400 ticks, 12 started and used 100: ours is 500 of the 800 busy.
            ours: HashMap::from([(10, 50), (11, 400), (12, 100)]),
        };
        assert_eq!(other_cpu_percent(&before, &after), Some(30.0));
        assert_eq!(other_cpu_percent(&after, &after), None);
        assert_eq!(other_cpu_percent(&after, &before), None);
    }

    #[test]
    fn power_and_heat_are_read_from_sysfs() {
        let sys = tempfile::tempdir().expect("dir");
        let supply = sys.path().join("class/power_supply");
        let write = |path: &Path, name: &str, value: &str| {
            std::fs::create_dir_all(path).expect("dir");
            std::fs::write(path.join(name), value).expect("write");
        };
        // No power supply class: a machine without a battery.
        assert_eq!(on_battery(&supply), Some(false));
        write(&supply.join("BAT0"), "type", "Battery\n");
        write(&supply.join("BAT0"), "status", "Discharging\n");
        assert_eq!(on_battery(&supply), Some(true));
        write(&supply.join("AC"), "type", "Mains\n");
        write(&supply.join("AC"), "online", "1\n");
        assert_eq!(on_battery(&supply), Some(false));
        write(&supply.join("AC"), "online", "0\n");
        assert_eq!(on_battery(&supply), Some(true));
        write(&supply.join("BAT0"), "status", "Charging\n");
        assert_eq!(on_battery(&supply), Some(false));

        let thermal = sys.path().join("class/thermal");
        assert_eq!(hottest_zone(&thermal), None);
        write(&thermal.join("thermal_zone0"), "temp", "45000\n");
        write(&thermal.join("thermal_zone1"), "temp", "71500\n");
        write(&thermal.join("thermal_zone2"), "temp", "-273000\n");
        write(&thermal.join("cooling_device0"), "temp", "99000\n");
        assert_eq!(hottest_zone(&thermal), Some(71.5));

        let mut probe = Probe::with_roots(
            sys.path().join("no-proc"),
            sys.path(),
            IdleSource::Unknown,
            1,
        );
        let reading = probe.read(true);
        assert_eq!(reading.idle_for, None);
        assert_eq!(reading.other_cpu_percent, None);
        assert_eq!(reading.on_battery, Some(false));
        assert_eq!(reading.temperature_c, Some(71.5));
        assert_eq!(probe.idle_source(), "unknown");
    }

    #[test]
    fn logind_idle_time_runs_from_its_idle_since_hint() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let since = |secs: u64| idle_since(secs * 1_000_000, now);
        assert_eq!(since(1_000_000 - 300), Duration::from_secs(300));
        assert_eq!(since(1_000_000), Duration::ZERO);
        // A hint in the future (the clock went back): not idle at all.
        assert_eq!(since(2_000_000), Duration::ZERO);
        // Idle with no hint of since when: idle since the epoch, as long as can be.
        assert_eq!(since(0), Duration::from_secs(1_000_000));
    }

    #[test]
    fn logind_is_asked_over_the_bus_and_its_absence_is_no_answer() {
        use crate::conditions::dbus::tests::{Daemon, fake_bus, g};

        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("bus");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let since = Duration::from_secs(1_700_000_000 - 90);
        let mut idle_since_hint = g("t");
        idle_since_hint.extend_from_slice(&[0; 5]);
        idle_since_hint.extend_from_slice(&(since.as_micros() as u64).to_le_bytes());
        let bus = fake_bus(
            &socket,
            vec![
                ("v", vec![1, b'b', 0, 0, 1, 0, 0, 0]),
                ("v", idle_since_hint),
                ("v", vec![1, b'b', 0, 0, 0, 0, 0, 0]),
            ],
        );
        let mut logind = Logind::at(Some(socket.clone()));
        assert_eq!(logind.idle_for(now), Some(Duration::from_secs(90)));
        // The same connection again.
        assert_eq!(logind.idle_for(now), Some(Duration::ZERO));
        let calls = bus.join().expect("the bus served");
        assert_eq!(calls.len(), 4, "Hello and three property reads");
        let text = String::from_utf8_lossy(&calls[2]).into_owned();
        for word in [LOGIND, LOGIND_PATH, LOGIND_MANAGER, "IdleSinceHint"] {
            assert!(text.contains(word), "{word} in {text:?}");
        }
        // The fake bus has gone: the connection is made again, fails, and there is no answer.
        assert_eq!(logind.idle_for(now), None);
        assert!(logind.bus.is_none());

        // No bus at all, and no usable address: no answer, at once.
        let started = Instant::now();
        assert_eq!(Logind::at(Some(socket)).idle_for(now), None);
        assert_eq!(Logind::at(None).idle_for(now), None);
        assert!(started.elapsed() < Duration::from_secs(1));

        // A real bus without logind on it answers with an error; the connection is kept.
        let Some(daemon) = Daemon::start() else {
            eprintln!("skipped the real bus: no dbus-daemon (apt-get install dbus)");
            return;
        };
        let started = Instant::now();
        let mut logind = Logind::at(Some(daemon.socket.clone()));
        assert_eq!(logind.idle_for(now), None);
        assert!(logind.bus.is_some());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn this_process_and_its_children_are_ours() {
        // The real /proc: a child of this process is ours, so its CPU time is not "other
        // programs'".
        let probe = Probe::with_roots("/proc", "/sys", IdleSource::Unknown, std::process::id());
        let first = probe.cpu_sample().expect("a Linux /proc");
        assert!(first.ours.contains_key(&std::process::id()));
        let mut child = Command::new("sleep").arg("5").spawn().expect("sleep runs");
        let second = probe.cpu_sample().expect("a Linux /proc");
        assert!(second.ours.contains_key(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(local_time(SystemTime::now()).is_some());
    }
}
