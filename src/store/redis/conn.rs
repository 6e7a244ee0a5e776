//! The connection to Redis: one plain server (with replicas or not) or a Redis Cluster, behind one
//! type, so that the store does not care which. Both reconnect by themselves: a command sent while
//! Redis is away fails at once or after the response timeout, and the next one tries again.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct Target {
    /// `redis://` or `rediss://` URLs: one for a plain server, any number of a cluster's nodes.
    pub urls: Vec<String>,
    /// The URLs name nodes of a Redis Cluster.
    pub cluster: bool,
    /// Longest wait for a connection or one reply.
    pub timeout: Duration,
}

/// A connection shared by every task of the process (commands are pipelined on it).
#[derive(Clone)]
pub enum Conn {
    /// A plain server.
    Single(ConnectionManager),
    /// A Redis Cluster: commands are routed by the hash slot of their first key.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects. A plain server is connected lazily (the first command connects), so that a
    /// node starts, and reports itself unready, while Redis is down; a cluster must answer once,
    /// to learn its slots.
    pub async fn open(target: &Target) -> RedisResult<Self> {
        if target.cluster {
            let client = ClusterClientBuilder::new(target.urls.clone())
                .connection_timeout(target.timeout)
                .response_timeout(target.timeout)
                .retries(2)
                .build()?;
            Ok(Self::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(target.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(target.timeout))
                .set_response_timeout(Some(target.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Ok(Self::Single(ConnectionManager::new_lazy_with_config(client, config)?))
        }
    }
}

/// Every request to Redis (a command, or a pipeline of them) is one round trip, counted for
/// `/metrics` (`sio_push_redis_round_trips_total`).
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        crate::metrics::redis_round_trip();
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        crate::metrics::redis_round_trip();
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// `WAIT replicas timeout` on the server that holds `key`: how many replicas have every
    /// write this connection made so far.
    pub async fn wait(&mut self, key: &str, replicas: u32, timeout: Duration) -> RedisResult<u32> {
        crate::metrics::redis_round_trip();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    key,
                    SlotAddr::Master,
                )));
                Ok(redis::from_redis_value(c.route_command(cmd, route).await?)?)
            }
        }
    }
}

/// Runs `op`, and once more if it failed before reaching Redis: the first command on a connection
/// that Redis closed (a restart) fails with a broken pipe, and the connection reconnects for the
/// next. An error after the command was sent is returned as is: it may have been carried out.
pub async fn once_more_if_unsent<T, F, Fut>(mut op: F) -> RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RedisResult<T>>,
{
    match op().await {
        Err(e) if unsent(&e) => op().await,
        other => other,
    }
}

fn unsent(e: &redis::RedisError) -> bool {
    // The crate does not expose the io::Error's kind; its message is that of the kind.
    let text = e.to_string().to_lowercase();
    e.is_connection_refusal()
        || (e.kind() == redis::ErrorKind::Io && (text.contains("broken pipe") || text.contains("not connected")))
}
