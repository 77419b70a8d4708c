//! When a volunteer's machine may work: the conditions they set, checked against what the
//! machine reports.
//!
//! [`Gate`] is sans-IO: a [`Reading`] of the machine (how long since the last keyboard or
//! mouse input, other programs' CPU use, battery, temperature, the local time) goes in with the
//! time, and out comes which conditions hold now ([`Holds`]). Each condition has its own
//! hysteresis, so a machine near a threshold does not make the worker stop and start every
//! few seconds. [`probe`] takes the readings on Linux; [`DutyCycle`] is the on/off rhythm of
//! a CPU-percentage cap.

mod dbus;
pub mod probe;
mod watch;
mod window;

use std::time::{Duration, Instant};

pub use watch::{POLL, watch, watch_with};
pub use window::{LocalTime, Window, WindowError};

/// What a volunteer allows. The defaults run whenever the worker runs, except on battery.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditions {
    /// Work only while nobody uses the machine.
    pub only_when_idle: bool,
    /// How long without keyboard or mouse input makes the machine idle (BOINC: 3 minutes).
    pub idle_after: Duration,
    /// Stop while other programs use more than this share of the whole machine's CPU.
    pub suspend_above_cpu_percent: Option<f64>,
    /// Work while the machine runs on its battery.
    pub run_on_battery: bool,
    /// Stop at this temperature (the hottest thermal zone), in °C.
    pub max_temperature_c: Option<f64>,
    /// Weekly windows work may run in; none means any time.
    pub windows: Vec<Window>,
    /// Share of the CPU time the unit hosts may use while someone uses the machine (or when
    /// that cannot be told), in percent; `None` is all of it.
    pub max_cpu_percent: Option<u8>,
    /// The same while the machine is idle.
    pub max_cpu_percent_idle: Option<u8>,
    /// Memory to offer while the machine is idle, in MiB, in place of what is offered while
    /// someone uses it; `None` offers the same at all times.
    pub memory_mb_idle: Option<u32>,
}

impl Default for Conditions {
    fn default() -> Self {
        Self {
            only_when_idle: false,
            idle_after: Duration::from_secs(180),
            suspend_above_cpu_percent: None,
            run_on_battery: false,
            max_temperature_c: None,
            windows: Vec::new(),
            max_cpu_percent: None,
            max_cpu_percent_idle: None,
            memory_mb_idle: None,
        }
    }
}

/// How far below the CPU threshold other programs must stay, and for how long, before work
/// resumes: a program that uses 30 % and then 20 % of the CPU under a 25 % threshold does not
/// start and stop the work each time.
pub const CPU_RESUME_FRACTION: f64 = 0.75;
pub const CPU_RESUME_AFTER: Duration = Duration::from_secs(30);
/// Mains power must be back this long before work resumes (a loose plug, a power blip).
pub const MAINS_RESUME_AFTER: Duration = Duration::from_secs(10);
/// The machine must cool this far below the limit before work resumes.
pub const COOL_BELOW_C: f64 = 5.0;

/// One look at the machine. `None` is "could not tell", never a guess.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Time since the last keyboard or mouse input.
    pub idle_for: Option<Duration>,
    /// Other programs' share of the whole machine's CPU since the last reading, in percent.
    pub other_cpu_percent: Option<f64>,
    pub on_battery: Option<bool>,
    /// The hottest thermal zone, °C.
    pub temperature_c: Option<f64>,
    pub local_time: Option<LocalTime>,
}

/// Which conditions hold now; work is suspended while any does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holds {
    pub user_active: bool,
    pub on_battery: bool,
    pub outside_window: bool,
    pub cpu_busy: bool,
    pub too_hot: bool,
}

impl Holds {
    pub fn any(&self) -> bool {
        self.user_active || self.on_battery || self.outside_window || self.cpu_busy || self.too_hot
    }
}

/// The conditions and the state their hysteresis needs.
#[derive(Debug, Clone)]
pub struct Gate {
    conditions: Conditions,
    holds: Holds,
    /// Since when other programs' CPU use has been below the resume level.
    cpu_quiet_since: Option<Instant>,
    /// Since when the machine has been on mains power again.
    mains_since: Option<Instant>,
}

impl Gate {
    pub fn new(conditions: Conditions) -> Self {
        Self {
            conditions,
            holds: Holds::default(),
            cpu_quiet_since: None,
            mains_since: None,
        }
    }

    pub fn conditions(&self) -> &Conditions {
        &self.conditions
    }

    /// New conditions (an edited config file): what holds is judged again from the next
    /// reading, with the hysteresis state kept.
    pub fn set_conditions(&mut self, conditions: Conditions) {
        self.conditions = conditions;
    }

    /// What holds after `reading`, taken at `now`.
    pub fn observe(&mut self, reading: &Reading, now: Instant) -> Holds {
        let c = &self.conditions;
        // The idle time itself is the hysteresis: after any input, work waits `idle_after`.
        // Asked to work only when idle where idleness cannot be read, it does not work.
        self.holds.user_active =
            c.only_when_idle && reading.idle_for.is_none_or(|idle| idle < c.idle_after);

        self.holds.cpu_busy = match (c.suspend_above_cpu_percent, reading.other_cpu_percent) {
            (Some(limit), Some(used)) if used > limit => {
                self.cpu_quiet_since = None;
                true
            }
            (Some(limit), Some(used)) if self.holds.cpu_busy => {
                if used > limit * CPU_RESUME_FRACTION {
                    self.cpu_quiet_since = None;
                    true
                } else {
                    let since = *self.cpu_quiet_since.get_or_insert(now);
                    now.duration_since(since) < CPU_RESUME_AFTER
                }
            }
            // Unknown CPU use keeps what was decided last.
            (Some(_), None) => self.holds.cpu_busy,
            _ => {
                self.cpu_quiet_since = None;
                false
            }
        };

        self.holds.on_battery = match (c.run_on_battery, reading.on_battery) {
            (true, _) => false,
            (false, Some(true)) => {
                self.mains_since = None;
                true
            }
            (false, Some(false)) if self.holds.on_battery => {
                let since = *self.mains_since.get_or_insert(now);
                now.duration_since(since) < MAINS_RESUME_AFTER
            }
            (false, Some(false)) => false,
            (false, None) => self.holds.on_battery,
        };

        self.holds.too_hot = match (c.max_temperature_c, reading.temperature_c) {
            (Some(limit), Some(t)) if t >= limit => true,
            (Some(limit), Some(t)) if self.holds.too_hot => t > limit - COOL_BELOW_C,
            (Some(_), None) => self.holds.too_hot,
            _ => false,
        };

        self.holds.outside_window = !c.windows.is_empty()
            && reading
                .local_time
                .is_none_or(|t| !c.windows.iter().any(|w| w.contains(t)));
        self.holds
    }
}

impl Gate {
    /// The CPU cap that applies after `reading`: the idle one only when the machine is known
    /// to have been idle for `idle_after`.
    pub fn cpu_cap(&self, reading: &Reading) -> Option<u8> {
        let c = &self.conditions;
        let idle = reading.idle_for.is_some_and(|idle| idle >= c.idle_after);
        if idle {
            c.max_cpu_percent_idle
        } else {
            c.max_cpu_percent
        }
        .filter(|p| *p < 100)
    }

    /// The memory to offer after `reading`: the idle amount only when the machine is known to
    /// have been idle for `idle_after`; `None` is what is offered while it is in use.
    pub fn memory_cap(&self, reading: &Reading) -> Option<u32> {
        let c = &self.conditions;
        let idle = reading.idle_for.is_some_and(|idle| idle >= c.idle_after);
        c.memory_mb_idle.filter(|_| idle)
    }
}

/// The on/off rhythm that holds donated work to a share of the CPU: within every `period`, the
/// unit hosts run for `percent` of it and are stopped for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DutyCycle {
    percent: u8,
    period: Duration,
}

/// BOINC cycles once a second; a shorter period keeps the stops short enough that a unit's
/// progress and the machine's fans look steady.
pub const DUTY_PERIOD: Duration = Duration::from_millis(500);

impl DutyCycle {
    /// `percent` of every [`DUTY_PERIOD`], clamped to 1–100.
    pub fn new(percent: u8) -> Self {
        Self {
            percent: percent.clamp(1, 100),
            period: DUTY_PERIOD,
        }
    }

    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Whether the hosts run at `elapsed` since the cycle began, and how long until that
    /// changes (`None` at 100 %: they always run).
    pub fn phase(&self, elapsed: Duration) -> (bool, Option<Duration>) {
        if self.percent >= 100 {
            return (true, None);
        }
        let period = self.period.as_nanos();
        let on = period * u128::from(self.percent) / 100;
        let at = elapsed.as_nanos() % period;
        let nanos = |n: u128| Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX));
        if at < on {
            (true, Some(nanos(on - at)))
        } else {
            (false, Some(nanos(period - at)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Reading {
        Reading {
            idle_for: Some(Duration::ZERO),
            other_cpu_percent: Some(0.0),
            on_battery: Some(false),
            temperature_c: Some(40.0),
            local_time: Some(LocalTime::new(0, 12 * 60)),
        }
    }

    #[test]
    fn the_defaults_hold_nothing_on_mains() {
        let mut gate = Gate::new(Conditions::default());
        let now = Instant::now();
        assert!(!gate.observe(&reading(), now).any());
        // Except the battery: off by default, as BOINC.
        let on_battery = Reading {
            on_battery: Some(true),
            ..reading()
        };
        assert_eq!(
            gate.observe(&on_battery, now),
            Holds {
                on_battery: true,
                ..Holds::default()
            }
        );
    }

    #[test]
    fn only_when_idle_waits_for_idle_after_and_refuses_to_guess() {
        let mut gate = Gate::new(Conditions {
            only_when_idle: true,
            idle_after: Duration::from_secs(60),
            ..Conditions::default()
        });
        let now = Instant::now();
        let idle = |secs| Reading {
            idle_for: Some(Duration::from_secs(secs)),
            ..reading()
        };
        assert!(gate.observe(&idle(5), now).user_active);
        assert!(gate.observe(&idle(59), now).user_active);
        assert!(!gate.observe(&idle(60), now).user_active);
        // A key pressed: at once.
        assert!(gate.observe(&idle(0), now).user_active);
        let unknown = Reading {
            idle_for: None,
            ..reading()
        };
        assert!(gate.observe(&unknown, now).user_active);
    }

    #[test]
    fn a_busy_cpu_stops_work_at_once_and_resumes_after_a_quiet_spell() {
        let mut gate = Gate::new(Conditions {
            suspend_above_cpu_percent: Some(25.0),
            ..Conditions::default()
        });
        let t0 = Instant::now();
        let cpu = |percent| Reading {
            other_cpu_percent: Some(percent),
            ..reading()
        };
        assert!(!gate.observe(&cpu(24.0), t0).cpu_busy);
        assert!(gate.observe(&cpu(30.0), t0).cpu_busy);
        // Below the threshold but not below the resume level: still busy, however long.
        assert!(
            gate.observe(&cpu(20.0), t0 + Duration::from_secs(60))
                .cpu_busy
        );
        // Quiet, but not for long enough yet.
        let quiet = t0 + Duration::from_secs(61);
        assert!(gate.observe(&cpu(10.0), quiet).cpu_busy);
        assert!(
            gate.observe(&cpu(10.0), quiet + Duration::from_secs(29))
                .cpu_busy
        );
        // A burst restarts the quiet spell.
        assert!(
            gate.observe(&cpu(19.0), quiet + Duration::from_secs(29))
                .cpu_busy
        );
        let again = quiet + Duration::from_secs(30);
        assert!(gate.observe(&cpu(10.0), again).cpu_busy);
        assert!(!gate.observe(&cpu(10.0), again + CPU_RESUME_AFTER).cpu_busy);
    }

    #[test]
    fn mains_must_stay_back_and_heat_must_fall_below_the_limit() {
        let mut gate = Gate::new(Conditions {
            max_temperature_c: Some(80.0),
            ..Conditions::default()
        });
        let t0 = Instant::now();
        let power = |battery| Reading {
            on_battery: Some(battery),
            ..reading()
        };
        assert!(gate.observe(&power(true), t0).on_battery);
        assert!(gate.observe(&power(false), t0).on_battery);
        assert!(
            gate.observe(&power(false), t0 + Duration::from_secs(9))
                .on_battery
        );
        assert!(
            !gate
                .observe(&power(false), t0 + MAINS_RESUME_AFTER)
                .on_battery
        );

        let heat = |c| Reading {
            temperature_c: Some(c),
            ..reading()
        };
        assert!(!gate.observe(&heat(79.0), t0).too_hot);
        assert!(gate.observe(&heat(80.0), t0).too_hot);
        assert!(gate.observe(&heat(76.0), t0).too_hot);
        assert!(!gate.observe(&heat(75.0), t0).too_hot);
        assert!(!gate.observe(&heat(79.0), t0).too_hot);
    }

    #[test]
    fn outside_every_window_holds_and_an_unknown_time_is_outside() {
        let mut gate = Gate::new(Conditions {
            windows: vec![Window::parse("Mon-Fri 18:00-08:00").expect("window")],
            ..Conditions::default()
        });
        let now = Instant::now();
        let at = |day: u8, hour: u16| Reading {
            local_time: Some(LocalTime::new(day, hour * 60)),
            ..reading()
        };
        assert!(gate.observe(&at(0, 12), now).outside_window);
        assert!(!gate.observe(&at(0, 19), now).outside_window);
        // Friday night runs into Saturday morning; Saturday night does not.
        assert!(!gate.observe(&at(5, 7), now).outside_window);
        assert!(gate.observe(&at(5, 19), now).outside_window);
        let unknown = Reading {
            local_time: None,
            ..reading()
        };
        assert!(gate.observe(&unknown, now).outside_window);
    }

    #[test]
    fn the_cpu_cap_follows_whether_the_machine_is_idle() {
        let gate = Gate::new(Conditions {
            max_cpu_percent: Some(40),
            max_cpu_percent_idle: Some(100),
            idle_after: Duration::from_secs(60),
            ..Conditions::default()
        });
        let idle = |secs: Option<u64>| Reading {
            idle_for: secs.map(Duration::from_secs),
            ..reading()
        };
        assert_eq!(gate.cpu_cap(&idle(Some(5))), Some(40));
        assert_eq!(gate.cpu_cap(&idle(None)), Some(40));
        assert_eq!(gate.cpu_cap(&idle(Some(60))), None);
    }

    #[test]
    fn the_memory_offered_follows_whether_the_machine_is_idle() {
        let gate = Gate::new(Conditions {
            memory_mb_idle: Some(8192),
            idle_after: Duration::from_secs(60),
            ..Conditions::default()
        });
        let idle = |secs: Option<u64>| Reading {
            idle_for: secs.map(Duration::from_secs),
            ..reading()
        };
        assert_eq!(gate.memory_cap(&idle(Some(59))), None);
        // Unknown is not idle: no more memory on a guess.
        assert_eq!(gate.memory_cap(&idle(None)), None);
        assert_eq!(gate.memory_cap(&idle(Some(60))), Some(8192));
        let same = Gate::new(Conditions::default());
        assert_eq!(same.memory_cap(&idle(Some(3600))), None);
    }

    #[test]
    fn a_duty_cycle_runs_its_share_of_every_period() {
        let half = DutyCycle::new(50);
        assert_eq!(half.phase(Duration::ZERO), (true, Some(DUTY_PERIOD / 2)));
        assert_eq!(half.phase(DUTY_PERIOD / 2), (false, Some(DUTY_PERIOD / 2)));
        assert_eq!(
            half.phase(DUTY_PERIOD * 3 + DUTY_PERIOD / 4),
            (true, Some(DUTY_PERIOD / 4))
        );
        assert_eq!(
            DutyCycle::new(100).phase(Duration::from_secs(7)),
            (true, None)
        );
        // Sampled finely, the share of time on is the percentage asked for.
        for percent in [1u8, 10, 25, 90] {
            let cycle = DutyCycle::new(percent);
            let step = Duration::from_micros(500);
            let on = (0..10_000).filter(|i| cycle.phase(step * *i).0).count();
            assert_eq!(on, usize::from(percent) * 100, "{percent} %");
        }
        assert_eq!(DutyCycle::new(0).percent(), 1);
    }
}
