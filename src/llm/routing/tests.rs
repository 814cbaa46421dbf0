//! Choosing a target: by weight within a priority, the next priority when none is
//! available, and the cost of a choice.

use std::time::{Duration, Instant};

use super::*;
use crate::config::{
    routing::{ServedModel, TargetConfig, UpstreamConfig},
    UpstreamUrl,
};

fn router(targets: &[(&str, u32, u32)]) -> Router {
    let mut config = Config::from_lookup(|_| None).unwrap();
    config.retry = RetryPolicy {
        max_attempts: 3,
        failures_to_open: 1,
        cooldown: Duration::from_secs(30),
        cooldown_max: Duration::from_secs(60),
    };
    let upstreams = targets
        .iter()
        .map(|(name, _, _)| UpstreamConfig {
            name: name.to_string(),
            base_url: UpstreamUrl::parse("http://127.0.0.1:9/v1").unwrap(),
            api_key: None,
            timeout: None,
            headers: Vec::new(),
            max_concurrent: None,
        })
        .collect();
    let routing = Routing {
        upstreams,
        models: vec![ServedModel {
            name: "m".into(),
            targets: targets
                .iter()
                .map(|(name, weight, priority)| TargetConfig {
                    upstream: name.to_string(),
                    model: "m".into(),
                    weight: *weight,
                    priority: *priority,
                })
                .collect(),
        }],
    };
    Router::new(&routing, &config, Metrics::new()).unwrap()
}

/// The upstream the next choice lands on, or `None` when none is available.
fn next(router: &Router) -> Option<String> {
    match router.models["m"].choose(0, Instant::now()) {
        Choice::Target { index, .. } => {
            let target = &router.models["m"].targets[index];
            Some(target.upstream.name().to_string())
        }
        Choice::Out => None,
    }
}

#[test]
fn calls_are_shared_by_weight_exactly_over_each_round() {
    let router = router(&[("a", 3, 0), ("b", 1, 0), ("c", 5, 1)]);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..1000 {
        *counts.entry(next(&router).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts["a"], 750);
    assert_eq!(counts["b"], 250);
    assert!(
        !counts.contains_key("c"),
        "the lower priority is a fallback"
    );
}

#[test]
fn a_lower_priority_serves_only_while_every_higher_target_rests() {
    let router = router(&[("a", 1, 0), ("b", 1, 1)]);
    let route = &router.models["m"];
    assert!(
        route.targets[0].health.failed(Instant::now(), false),
        "opens at once"
    );
    assert_eq!(next(&router).as_deref(), Some("b"));
    route.targets[1]
        .health
        .busy(Instant::now(), Duration::from_secs(5));
    assert!(matches!(route.choose(0, Instant::now()), Choice::Out));
    let wait = route.resting_until(Instant::now()).unwrap() - Instant::now();
    assert!(wait <= Duration::from_secs(5) && wait > Duration::from_secs(4));
    route.targets[0].health.succeeded();
    assert_eq!(next(&router).as_deref(), Some("a"));
}

#[test]
fn targets_already_tried_are_not_chosen_again() {
    let router = router(&[("a", 1, 0), ("b", 1, 0)]);
    let route = &router.models["m"];
    for _ in 0..10 {
        match route.choose(0b01, Instant::now()) {
            Choice::Target { index, .. } => assert_eq!(index, 1),
            Choice::Out => panic!("b is free"),
        }
    }
    assert!(matches!(route.choose(0b11, Instant::now()), Choice::Out));
    assert_eq!(
        route.resting_until(Instant::now()),
        None,
        "tried is not resting"
    );
}

#[test]
fn asking_whether_every_target_rests_takes_no_probe() {
    let router = router(&[("a", 1, 0)]);
    let route = &router.models["m"];
    let opened = Instant::now() - Duration::from_secs(31);
    assert!(route.targets[0].health.failed(opened, false));
    // Half open: the question leaves the probe to the next call.
    assert_eq!(route.resting_until(Instant::now()), None);
    assert_eq!(route.resting_until(Instant::now()), None);
    match route.choose(0, Instant::now()) {
        Choice::Target { probe, .. } => assert!(probe),
        Choice::Out => panic!("the probe is free"),
    }
    assert!(route.resting_until(Instant::now()).is_some(), "probing");
}
