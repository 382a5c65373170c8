//! The fleet's ears: one pub/sub connection per process, subscribed to
//! every profile's channel under the key prefix, handing each message to
//! the members (a rejection is applied at once; a publication wakes a
//! waiting fetch). It is also the probe that rejoins after an outage:
//! while the link is down it pings Redis every [`PROBE`], and it
//! reconnects a lost subscription with a bounded backoff.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::member::Member;
use super::redis::{Redis, RedisDown};

/// How often Redis is probed while the link is down.
pub const PROBE: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to subscribe.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// The pause after `failures` failed attempts to subscribe in a row.
fn retry_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(250);
    base.saturating_mul(1 << failures.min(4)).min(MAX_RETRY)
}

/// Listens until `stop`.
pub async fn listen(
    client: redis::Client,
    redis: Redis,
    prefix: String,
    members: Vec<Arc<Member>>,
    timeout: Duration,
    stop: CancellationToken,
) {
    let pattern = Keys::events_pattern(&prefix);
    let mut failures = 0u32;
    // Each round ends with a pause or with `stop`.
    while !stop.is_cancelled() {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = tokio::time::timeout(timeout, connect) => connected,
        };
        match connected {
            Ok(Ok(pubsub)) => {
                failures = 0;
                // Members hear only under keys they know: learn them now.
                for member in &members {
                    member.sealing().await;
                }
                let _ = redis.ping().await;
                let mut messages = pubsub.into_on_message();
                let mut probe = tokio::time::interval(PROBE);
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => return,
                        message = messages.next() => {
                            let Some(message) = message else {
                                redis.link().down(&RedisDown("the subscription was cut".into()));
                                break;
                            };
                            let channel = message.get_channel_name();
                            for member in &members {
                                member.hear(channel, message.get_payload_bytes());
                            }
                        }
                        _ = probe.tick() => {
                            if redis.link().is_down() {
                                let _ = redis.ping().await;
                            }
                        }
                    }
                }
            }
            Ok(Err(error)) => {
                redis.link().down(&RedisDown(format!("subscribe: {error}")));
                failures = failures.saturating_add(1);
            }
            Err(_) => {
                redis.link().down(&RedisDown(format!(
                    "subscribe: no answer within {} ms",
                    timeout.as_millis()
                )));
                failures = failures.saturating_add(1);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry_delay(failures)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_bound() {
        let ms = Duration::from_millis;
        let cases = [
            (0, ms(250)),
            (1, ms(500)),
            (2, ms(1000)),
            (3, ms(1000)),
            (9, ms(1000)),
            (u32::MAX, ms(1000)),
        ];
        for (failures, delay) in cases {
            assert_eq!(retry_delay(failures), delay, "{failures}");
        }
    }
}
