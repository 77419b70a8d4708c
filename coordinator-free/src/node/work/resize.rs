//! A running peer's donation changing: the work task takes new units by the new number of
//! slots, and declines offers by the new share of memory.
//!
//! The unit threads are replaced rather than grown or shrunk one by one: a new executor with
//! the new number of threads (and unit hosts started with the new limits) takes every unit
//! started from now on, while the old one finishes the units it holds, reports them as usual
//! and then stops. The intake counts those units as running, so after a shrink nothing new
//! starts until the running units fit the new number of slots; no unit is killed by it.

use std::time::Instant;

use super::{Exec, SHORT_UNIT, SHORT_UNITS_PER_SLOT, Work};
use crate::node::Donation;
use crate::sandbox::{Executor, HostSwitch, SandboxError, UnitHostCommand};
use crate::schedule::IntakeEvent;

impl Work {
    pub(super) fn resize(&mut self, donation: Donation, now: Instant) {
        let slots = u32::from(donation.cores).max(1);
        self.memory_per_slot = donation.memory_per_slot();
        let new_command = match (donation.unit_host, &self.unit_host) {
            (Some(new), Some(old)) if !same_command(&new, old) => Some(new),
            _ => None,
        };
        if slots != self.slots || new_command.is_some() {
            let command = new_command.as_ref().or(self.unit_host.as_ref());
            match self
                .exec
                .as_ref()
                .and_then(|exec| exec.resized(slots, command, &self.host_switch))
            {
                Some(Ok(exec)) => {
                    if let Some(old) = self.exec.replace(exec) {
                        retire(old);
                    }
                    if let Some(command) = new_command {
                        self.unit_host = Some(command);
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, slots, "cannot start unit threads for the new donation; keeping {} slots", self.slots);
                    return;
                }
                None => return,
            }
        }
        // What the queue asks submitters for scales with the slots; the next unit to end
        // sizes it again from the units' running time.
        let cap_per_slot = (self.max_prefetch / self.slots.max(1)).max(1);
        self.max_prefetch = cap_per_slot * slots;
        self.slots = slots;
        self.at_once = if self.unit_time.is_some_and(|t| t < SHORT_UNIT) {
            slots * SHORT_UNITS_PER_SLOT
        } else {
            slots
        };
        self.intake
            .handle(IntakeEvent::SlotsChanged(self.at_once), now);
    }
}

impl Exec {
    /// An executor like this one with `slots` threads: unit hosts started by `command`, or the
    /// same in-process sandbox (whose prepared modules stay valid). `None` when this executor
    /// runs unit hosts and no command is known.
    /// New unit hosts answer to the peer's `switch`, so a suspension stops them too.
    fn resized(
        &self,
        slots: u32,
        command: Option<&UnitHostCommand>,
        switch: &HostSwitch,
    ) -> Option<Result<Exec, SandboxError>> {
        let depth = (slots * SHORT_UNITS_PER_SLOT) as usize + 2;
        Some(match (self, command) {
            (Exec::Hosts(_), Some(command)) => {
                Executor::unit_hosts_with_switch(command, slots as usize, depth, switch)
                    .map(Exec::Hosts)
            }
            (Exec::Hosts(_), None) => return None,
            (Exec::InProcess(_, sandbox), _) => {
                Executor::new(sandbox.clone(), slots as usize, depth)
                    .map(|executor| Exec::InProcess(executor, sandbox.clone()))
            }
        })
    }
}

fn same_command(a: &UnitHostCommand, b: &UnitHostCommand) -> bool {
    a.program == b.program && a.args == b.args
}

/// Lets an executor that takes no more units finish those it holds (their answers come back
/// as usual) on a thread of its own: joining its threads must not hold up the work task.
fn retire(exec: Exec) {
    let _ = std::thread::Builder::new()
        .name("cf-work-retire".into())
        .spawn(move || drop(exec));
}
