//! The loop that looks at the machine and suspends or resumes donated work: every [`POLL`] a
//! [`Probe`] reading goes through the [`Gate`], each condition that starts or stops holding is
//! set on the peer's [`SuspendSwitch`] as its suspension reason, and the CPU cap that applies
//! (in use or idle) is set when it changes.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::probe::Probe;
use super::{Conditions, Gate, Holds};
use crate::node::SuspendSwitch;
use crate::suspend::Reason;

/// How often the machine is looked at: twice a second, so the volunteer's machine is theirs
/// again within a second of a key press (Folding@home polls every 2 s). Other programs' CPU
/// use is measured over longer spells ([`super::probe::CPU_WINDOW`]).
pub const POLL: Duration = Duration::from_millis(500);

/// Watches this machine until the peer stops (its switch is gone) or `settings` is dropped.
/// New settings (an edited config file) apply from the next look. The memory to offer, which
/// may differ while the machine is idle, is published on `memory`
/// ([`Gate::memory_cap`](super::Gate::memory_cap)): what donates it applies it.
pub async fn watch(
    switch: SuspendSwitch,
    settings: watch::Receiver<Conditions>,
    memory: watch::Sender<Option<u32>>,
) {
    // Finding the idle source may ask logind, which can take a moment.
    let Ok(probe) = tokio::task::spawn_blocking(Probe::system).await else {
        return;
    };
    watch_with(switch, settings, probe, memory).await;
}

/// [`watch`] with readings from `probe`: a program embedding the library may report input
/// itself ([`super::probe::IdleSource::Reported`]), and tests drive the machine's state.
pub async fn watch_with(
    switch: SuspendSwitch,
    mut settings: watch::Receiver<Conditions>,
    mut probe: Probe,
    memory: watch::Sender<Option<u32>>,
) {
    let source = probe.idle_source();
    tracing::info!(idle = source, "watching the machine for when to work");
    if switch.set_idle_source(source).await.is_err() {
        return;
    }
    let mut gate = Gate::new(settings.borrow_and_update().clone());
    let mut warned_unknown = false;
    let mut held = Holds::default();
    let mut cap = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return;
                }
                gate.set_conditions(settings.borrow_and_update().clone());
            }
        }
        if gate.conditions().only_when_idle && source == "unknown" && !warned_unknown {
            warned_unknown = true;
            tracing::warn!(
                "only_when_idle is set, but this machine's idle time cannot be read (no logind session hints, no readable input device): no work until it can be"
            );
        }
        let c = gate.conditions();
        let idle =
            c.only_when_idle || c.max_cpu_percent_idle.is_some() || c.memory_mb_idle.is_some();
        let Ok((back, reading)) = tokio::task::spawn_blocking(move || {
            let reading = probe.read(idle);
            (probe, reading)
        })
        .await
        else {
            return;
        };
        probe = back;
        let holds = gate.observe(&reading, Instant::now());
        let now_cap = gate.cpu_cap(&reading);
        if now_cap != cap {
            if switch.set_cpu_cap(now_cap).await.is_err() {
                return;
            }
            cap = now_cap;
        }
        let now_memory = gate.memory_cap(&reading);
        memory.send_if_modified(|m| std::mem::replace(m, now_memory) != now_memory);
        for (reason, was, now) in [
            (Reason::UserActive, held.user_active, holds.user_active),
            (Reason::OnBattery, held.on_battery, holds.on_battery),
            (
                Reason::OutsideWindow,
                held.outside_window,
                holds.outside_window,
            ),
            (Reason::CpuBusy, held.cpu_busy, holds.cpu_busy),
            (Reason::TooHot, held.too_hot, holds.too_hot),
        ] {
            if was != now && switch.set(reason, now).await.is_err() {
                return;
            }
        }
        held = holds;
    }
}
