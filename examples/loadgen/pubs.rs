//! `pubs`: P publishers, each on its own topic (or all on one with `--shared-topic`), one
//! subscriber per topic. The key figure is publish acks per second; the latency is the ack's
//! round trip.

use crate::traffic::{Headline, Plan, Rate, Traffic};
use crate::{Args, Result};

/// `--publishers P` (50) `--shared-topic` (off) `--rate R|max` (max) and the shared traffic
/// options.
pub fn parse(args: &mut Args) -> Result<Traffic> {
    let publishers = args.get("publishers", 50)?;
    let topics = if args.get("shared-topic", false)? {
        1
    } else {
        publishers
    };
    let rate = args.get("rate", Rate::Max)?;
    Ok(Traffic {
        plan: Plan::from_args(args, topics, topics, publishers, rate)?,
        headline: Headline::Acks,
    })
}
