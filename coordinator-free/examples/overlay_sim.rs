//! Runs the overlay simulation at the scale of a volunteer network and prints what it
//! measured: the scenario of the internet-scale issue (5 % loss, 10 % of the peers churned per
//! minute, a flood of 10 % fresh identities from 20 hosts, a job advert broadcast every 30 s).
//!
//! ```sh
//! cargo run --release -p coordinator-free --example overlay_sim -- 10000 1
//! cargo run --release -p coordinator-free --example overlay_sim -- 100000 1
//! ```
//!
//! Arguments: the number of honest peers (default 10,000), the seed (default 1), and how many
//! well-known peers everyone bootstraps from (default 0: from any peer that has joined); and
//! optionally overlay timers as `NAME=SECONDS` (`max_age`, `reissue`, `refresh`, `shuffle`).

use std::process::ExitCode;

use coordinator_free::overlay::sim::{self, Report, Shape, SimConfig, Spread, Traffic};

fn main() -> ExitCode {
    // `NAME=SECONDS` arguments set the overlay's freshness timers (`max_age`, `reissue`,
    // `refresh`, `shuffle`), to explore what a shorter `max_age` costs; the rest are positional.
    let (timers, positional): (Vec<String>, Vec<String>) =
        std::env::args().skip(1).partition(|a| a.contains('='));
    let mut args = positional.into_iter();
    let parse = |arg: Option<String>, default: u64| match arg {
        None => Some(default),
        Some(text) => text.replace('_', "").parse().ok(),
    };
    let (Some(peers), Some(seed), Some(bootstrap)) = (
        parse(args.next(), 10_000),
        parse(args.next(), 1),
        parse(args.next(), 0),
    ) else {
        eprintln!(
            "usage: overlay_sim [PEERS] [SEED] [BOOTSTRAP_PEERS] [max_age=S] [reissue=S] [refresh=S] [shuffle=S]"
        );
        return ExitCode::FAILURE;
    };
    let mut cfg = SimConfig {
        bootstrap: bootstrap as usize,
        ..SimConfig::issue(peers as usize, seed)
    };
    for timer in &timers {
        let (key, value) = timer.split_once('=').unwrap_or_default();
        let at = value
            .parse::<f64>()
            .ok()
            .filter(|secs| *secs > 0.0)
            .and_then(|secs| std::time::Duration::try_from_secs_f64(secs).ok());
        let field = match key {
            "max_age" => &mut cfg.overlay.max_age,
            "reissue" => &mut cfg.overlay.reissue_interval,
            "refresh" => &mut cfg.overlay.refresh_interval,
            "shuffle" => &mut cfg.overlay.shuffle_interval,
            _ => {
                eprintln!("unknown timer {timer:?}: max_age, reissue, refresh or shuffle");
                return ExitCode::FAILURE;
            }
        };
        let Some(at) = at else {
            eprintln!("bad timer {timer:?}: a positive number of seconds");
            return ExitCode::FAILURE;
        };
        *field = at;
        println!("{key} = {value} s");
    }
    println!(
        "bootstrap from {}",
        match cfg.bootstrap {
            0 => "any peer that has joined".to_string(),
            n => format!("one of the first {n} peers"),
        }
    );
    println!(
        "{} honest peers, seed {}, loss {:.0} %, churn {:.0} %/min, {} Sybils from {} hosts",
        cfg.peers,
        cfg.seed,
        cfg.loss * 100.0,
        cfg.churn_per_minute * 100.0,
        (cfg.peers as f64 * cfg.sybil_share).round(),
        cfg.sybil_hosts
    );
    print_report(&sim::run(cfg));
    ExitCode::SUCCESS
}

fn traffic(t: &Traffic) -> String {
    format!("{:.0} / {:.0} / {:.0}", t.mean, t.p99, t.max)
}

fn spread(s: &Spread) -> String {
    format!(
        "{:.1} / {:.1} / {:.1} s ({} peers)",
        s.p50, s.p99, s.max, s.count
    )
}

fn shape_rows(name: &str, s: &Shape) {
    println!(
        "| {name} | {} | {:.3} % | {} / {:.2} / {} | {:.2} | {:.1} | {:.3} % | {:.2} % | {:.2} % |",
        s.live_honest,
        s.largest_component * 100.0,
        s.active_min,
        s.active_mean,
        s.active_max,
        s.outbound_mean,
        s.passive_mean,
        s.sybil_majority * 100.0,
        s.sybil_active_slots * 100.0,
        s.sybil_passive_slots * 100.0,
    );
    if s.outside > 0 {
        println!(
            "|   outside it: {} peers ({} of them started less than {} s ago) in {} components, the largest of {} | | | | | | | | |",
            s.outside,
            s.outside_joining,
            sim::JOINING.as_secs(),
            s.other_components,
            s.second_component
        );
    }
}

fn print_report(r: &Report) {
    println!();
    println!("| bytes sent per honest peer per second (mean / p99 / max) | |");
    println!("|---|---|");
    println!("| idle | {} |", traffic(&r.idle));
    println!("| churn | {} |", traffic(&r.churn));
    println!("| churn and Sybil flood | {} |", traffic(&r.flood));
    println!();
    println!(
        "| moment | live honest peers | largest component | active view min / mean / max | outbound mean | passive mean | majority-Sybil active views | Sybil share of active slots | of passive entries |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    shape_rows("after the joins", &r.after_joins);
    shape_rows("after churn", &r.after_churn);
    shape_rows("after the flood", &r.after_flood);
    println!();
    println!("| dead peers ({} crashed) | p50 / p99 / max |", r.crashed);
    println!("|---|---|");
    println!(
        "| left every active view | {} |",
        spread(&r.dead_left_active)
    );
    println!("| left every view | {} |", spread(&r.dead_left_all));
    println!(
        "| crashed longer than the copies' maximum age before the end, still in some view | {} |",
        r.dead_still_held
    );
    println!();
    println!(
        "| job adverts (PlumTree, {} published) | |",
        r.advert_reach.count + r.adverts_short
    );
    println!("|---|---|");
    let reach = &r.advert_reach;
    println!(
        "| reached 99 % of live honest peers: p50 / p99 / max | {:.1} / {:.1} / {:.1} s |",
        reach.p50, reach.p99, reach.max
    );
    println!("| never reached 99 % | {} |", r.adverts_short);
    println!(
        "| broadcast bytes sent per advert per live honest peer | {:.0} |",
        r.advert_bytes_per_peer
    );
    println!();
    println!(
        "{} messages ({} lost or undeliverable), {} events, {:.1} s of real time",
        r.messages,
        r.lost,
        r.events,
        r.wall.as_secs_f64()
    );
}
