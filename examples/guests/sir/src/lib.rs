//! The SIR epidemic model integrated with classic fixed-step RK4.
//!
//! `S' = −βSI/N`, `I' = βSI/N − γI`, `R' = γI`. Only `+ − × ÷` are used, so every peer computes
//! the same bits. A job sweeps `beta × gamma` over this unit.

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error};

/// Largest accepted number of integration steps (`days × steps_per_day`).
pub const MAX_STEPS: u64 = 100_000_000;

/// Model parameters and integration settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// Transmission rate per day.
    pub beta: f64,
    /// Recovery rate per day.
    pub gamma: f64,
    pub population: f64,
    pub initial_infected: f64,
    pub days: u32,
    pub steps_per_day: u32,
}

/// The epidemic's peak and final state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Largest number infected at any step.
    pub peak_infected: f64,
    /// The day in which that peak falls (`⌊step / steps_per_day⌋`, the first one on ties).
    pub peak_day: u32,
    pub final_susceptible: f64,
    pub final_recovered: f64,
}

impl Input {
    /// Rejects parameters the model does not cover and step counts too large to run.
    pub fn validate(&self) -> Result<(), String> {
        let rates_ok = [self.beta, self.gamma]
            .iter()
            .all(|r| r.is_finite() && *r >= 0.0);
        if !rates_ok {
            return Err("beta and gamma must be finite and non-negative".to_owned());
        }
        if !(self.population.is_finite() && self.population > 0.0) {
            return Err("population must be finite and positive".to_owned());
        }
        if !(0.0..=self.population).contains(&self.initial_infected) {
            return Err("initial_infected must lie in [0, population]".to_owned());
        }
        if self.steps_per_day == 0 {
            return Err("steps_per_day must be at least 1".to_owned());
        }
        let steps = u64::from(self.days) * u64::from(self.steps_per_day);
        if steps > MAX_STEPS {
            return Err(format!("{steps} steps exceed {MAX_STEPS}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    s: f64,
    i: f64,
    r: f64,
}

/// The integration in progress, advanced in chunks so the unit can report progress.
#[derive(Debug, Clone)]
struct Simulation {
    beta: f64,
    gamma: f64,
    inv_n: f64,
    h: f64,
    steps_per_day: u32,
    total_steps: u64,
    step: u64,
    state: State,
    peak_infected: f64,
    peak_step: u64,
}

impl Simulation {
    fn new(input: &Input) -> Self {
        let state = State {
            s: input.population - input.initial_infected,
            i: input.initial_infected,
            r: 0.0,
        };
        Simulation {
            beta: input.beta,
            gamma: input.gamma,
            inv_n: 1.0 / input.population,
            h: 1.0 / f64::from(input.steps_per_day),
            steps_per_day: input.steps_per_day,
            total_steps: u64::from(input.days) * u64::from(input.steps_per_day),
            step: 0,
            state,
            peak_infected: state.i,
            peak_step: 0,
        }
    }

    fn derivative(&self, x: State) -> State {
        let infections = self.beta * x.s * x.i * self.inv_n;
        let recoveries = self.gamma * x.i;
        State {
            s: -infections,
            i: infections - recoveries,
            r: recoveries,
        }
    }

    fn rk4_step(&self, x: State) -> State {
        let h = self.h;
        let at = |k: State, scale: f64| State {
            s: x.s + scale * k.s,
            i: x.i + scale * k.i,
            r: x.r + scale * k.r,
        };
        let k1 = self.derivative(x);
        let k2 = self.derivative(at(k1, h / 2.0));
        let k3 = self.derivative(at(k2, h / 2.0));
        let k4 = self.derivative(at(k3, h));
        let blend = |a: f64, b: f64, c: f64, d: f64| (a + 2.0 * b + 2.0 * c + d) * (h / 6.0);
        State {
            s: x.s + blend(k1.s, k2.s, k3.s, k4.s),
            i: x.i + blend(k1.i, k2.i, k3.i, k4.i),
            r: x.r + blend(k1.r, k2.r, k3.r, k4.r),
        }
    }

    /// Runs up to `steps` more steps; returns whether the integration is complete.
    fn advance(&mut self, steps: u64) -> bool {
        let stop = self.total_steps.min(self.step.saturating_add(steps));
        while self.step < stop {
            self.state = self.rk4_step(self.state);
            self.step += 1;
            if self.state.i > self.peak_infected {
                self.peak_infected = self.state.i;
                self.peak_step = self.step;
            }
        }
        self.step == self.total_steps
    }

    fn output(&self) -> Output {
        Output {
            peak_infected: self.peak_infected,
            peak_day: (self.peak_step / u64::from(self.steps_per_day)) as u32,
            final_susceptible: self.state.s,
            final_recovered: self.state.r,
        }
    }
}

/// The whole computation, without the SDK. Expects an input that passed [`Input::validate`].
pub fn compute(input: &Input) -> Output {
    let mut sim = Simulation::new(input);
    sim.advance(u64::MAX);
    sim.output()
}

const STEPS_PER_REPORT: u64 = 1 << 16;

/// The work unit: validates, then integrates with a progress report every 65,536 steps.
pub fn unit(input: Input, ctx: &mut Context) -> Result<Output, Error> {
    input.validate()?;
    let mut sim = Simulation::new(&input);
    while !sim.advance(STEPS_PER_REPORT) {
        ctx.progress(sim.step, sim.total_steps);
    }
    ctx.progress(sim.total_steps, sim.total_steps);
    Ok(sim.output())
}

task_sdk::json_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::native::Harness;

    fn outbreak(beta: f64, gamma: f64) -> Input {
        Input {
            beta,
            gamma,
            population: 1_000_000.0,
            initial_infected: 10.0,
            days: 365,
            steps_per_day: 8,
        }
    }

    #[test]
    fn population_is_conserved_at_every_step() {
        let input = outbreak(0.4, 0.1);
        let mut sim = Simulation::new(&input);
        while !sim.advance(1) {
            let x = sim.state;
            assert!((x.s + x.i + x.r - input.population).abs() <= 1e-6 * input.population);
        }
        let out = sim.output();
        let infected = input.population - out.final_susceptible - out.final_recovered;
        assert!(infected.abs() < 1.0, "{out:?}");
    }

    #[test]
    fn epidemic_peaks_and_matches_final_size() {
        let input = outbreak(0.3, 0.1);
        let out = compute(&input);
        assert!(out.peak_infected > 100_000.0, "{out:?}");
        assert!(out.peak_day > 10 && out.peak_day < 200, "{out:?}");
        // Final-size relation for R0 = 3: s = exp(−R0 (1 − s)) with s the surviving fraction
        // (exp is fine here: this checks the model, not cross-machine bits).
        let s = out.final_susceptible / input.population;
        assert!((s - (-3.0 * (1.0 - s)).exp()).abs() < 1e-3, "s = {s}");
        assert!((s - 0.0595).abs() < 1e-3, "s = {s}");
    }

    #[test]
    fn below_threshold_there_is_no_outbreak() {
        let input = outbreak(0.05, 0.1);
        let out = compute(&input);
        assert_eq!(out.peak_day, 0);
        assert_eq!(out.peak_infected, input.initial_infected);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert!(outbreak(0.3, 0.1).validate().is_ok());
        assert!(outbreak(-0.3, 0.1).validate().is_err());
        assert!(
            Input {
                population: 0.0,
                ..outbreak(0.3, 0.1)
            }
            .validate()
            .is_err()
        );
        assert!(
            Input {
                initial_infected: 2e6,
                ..outbreak(0.3, 0.1)
            }
            .validate()
            .is_err()
        );
        assert!(
            Input {
                steps_per_day: 0,
                ..outbreak(0.3, 0.1)
            }
            .validate()
            .is_err()
        );
        let long = Input {
            days: u32::MAX,
            steps_per_day: u32::MAX,
            ..outbreak(0.3, 0.1)
        };
        assert!(long.validate().is_err());
        assert_eq!(
            Harness::json(&long)
                .run_json(unit)
                .result
                .unwrap_err()
                .code(),
            Error::UNIT
        );
    }

    #[test]
    fn unit_matches_compute() {
        let input = Input {
            days: 20_000,
            ..outbreak(0.25, 0.05)
        };
        let outcome = Harness::json(&input).run_json(unit);
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(outcome.result.unwrap(), expected);
        let steps = 20_000 * 8;
        assert_eq!(outcome.progress, Some((steps, steps)));
    }
}
