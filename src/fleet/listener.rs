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
use super::redis::Redis;

/// How often Redis is probed while the link is down.
pub const PROBE: Duration = Duration::from_secs(1);

/// The longest pause between two attempts to subscribe.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// The pause after `failures` failed attempts to subscribe in a row.
fn retry_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(250);
    base.saturating_mul(1 << failures.min(4)).min(MAX_RETRY)
}

/// How long the subscription's handshake (connect, TLS, `PSUBSCRIBE`:
/// several round trips) may take: a few command timeouts, at least 2 s.
fn handshake_timeout(command_timeout: Duration) -> Duration {
    command_timeout
        .saturating_mul(4)
        .max(Duration::from_secs(2))
}

/// Listens until `stop`. The subscription's trouble is logged once per
/// change and never marks Redis down (commands decide that: a user may
/// run commands without the right to subscribe); while the link is down,
/// Redis is probed every [`PROBE`], subscribed or not.
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
    let mut complained = false;
    // Each round ends with a pause or with `stop`.
    while !stop.is_cancelled() {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            connected = tokio::time::timeout(handshake_timeout(timeout), connect) => connected,
        };
        let error = match connected {
            Ok(Ok(pubsub)) => {
                failures = 0;
                if std::mem::take(&mut complained) {
                    tracing::info!("subscribed to the fleet's events again");
                }
                // Members hear only under keys they know: learn them now,
                // and what was rejected while they could not hear.
                for member in &members {
                    member.sealing().await;
                    member.catch_up(&redis).await;
                }
                let mut messages = pubsub.into_on_message();
                let mut probe = tokio::time::interval(PROBE);
                loop {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => return,
                        message = messages.next() => {
                            let Some(message) = message else {
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
                "the subscription was cut".to_string()
            }
            Ok(Err(error)) => format!("{error}"),
            Err(_) => format!(
                "no subscription within {} ms",
                handshake_timeout(timeout).as_millis()
            ),
        };
        failures = failures.saturating_add(1);
        // Is it Redis, or only the subscription? A command says (and sets
        // the link's state).
        let _ = redis.ping().await;
        if !complained {
            complained = true;
            tracing::warn!(
                error = %error,
                "not subscribed to the fleet's events (retrying): rejections and new tokens from \
                 other sidecars are learnt by polling Redis until it works"
            );
        }
        // The pause, probing a down link meanwhile.
        let resume = tokio::time::Instant::now() + retry_delay(failures);
        while tokio::time::Instant::now() < resume {
            if redis.link().is_down() {
                let _ = redis.ping().await;
            }
            // Not hearing publications: poll for rejections instead.
            if redis.link().usable() {
                for member in &members {
                    member.catch_up(&redis).await;
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(resume.min(tokio::time::Instant::now() + PROBE)) => {}
            }
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
