//! `fanout`: K topics, S subscribers spread evenly over them, one publisher per topic at a rate
//! or as fast as its window of acks allows. The key figure is deliveries per second with no
//! gap, duplicate or loss; the latency is end to end (publisher's send to subscriber's parse).

use crate::traffic::{Headline, Plan, Rate, Traffic};
use crate::{Args, Result};

/// `--topics K` (1) `--subscribers S` (100) `--rate R|max` (max) and the shared traffic options.
pub fn parse(args: &mut Args) -> Result<Traffic> {
    let topics = args.get("topics", 1)?;
    let subscribers = args.get("subscribers", 100)?;
    let rate = args.get("rate", Rate::Max)?;
    Ok(Traffic {
        plan: Plan::from_args(args, topics, subscribers, topics, rate)?,
        headline: Headline::Deliveries,
    })
}
