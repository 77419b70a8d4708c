//! LAN discovery: announce this peer with mDNS and feed the peers we hear about to the
//! membership state machine as discovered addresses (pinned to the id they announce, so a
//! spoofed answer can only cost a failed dial).

use std::net::{IpAddr, SocketAddr};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::Input;
use crate::membership::MAX_ADVERT_ADDRS;
use crate::peer_id::PeerId;

/// The DNS-SD service type peers announce.
pub const SERVICE_TYPE: &str = "_coordfree._udp.local.";
/// Characters of the peer id used as the instance name (DNS labels are at most 63).
const INSTANCE_LEN: usize = 20;

/// Registers our service and starts browsing. The returned daemon must be shut down to send
/// the goodbye announcement.
pub(super) fn start(
    me: PeerId,
    port: u16,
    addrs: &[SocketAddr],
    inputs: mpsc::Sender<Input>,
    tasks: &mut JoinSet<()>,
) -> Result<ServiceDaemon, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    let id = me.to_string();
    let instance: String = id.chars().take(INSTANCE_LEN).collect();
    let ips: Vec<IpAddr> = addrs
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    let properties = [("id", id.as_str()), ("v", "1")];
    let mut info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        &format!("{instance}.local."),
        &ips[..],
        port,
        &properties[..],
    )?;
    if ips.is_empty() {
        info = info.enable_addr_auto();
    }
    daemon.register(info)?;
    let events = daemon.browse(SERVICE_TYPE)?;
    tasks.spawn(async move {
        while let Ok(event) = events.recv_async().await {
            let ServiceEvent::ServiceResolved(service) = event else {
                continue;
            };
            // An answer without a valid id is still worth a dial: the handshake tells us who.
            let peer: Option<PeerId> = service
                .get_property_val_str("id")
                .and_then(|text| text.parse().ok());
            if peer == Some(me) {
                continue;
            }
            for ip in service.get_addresses().iter().take(MAX_ADVERT_ADDRS) {
                let ip = ip.to_ip_addr();
                if let IpAddr::V6(v6) = ip
                    && v6.is_unicast_link_local()
                {
                    continue;
                }
                let addr = SocketAddr::new(ip, service.port);
                tracing::debug!(%addr, ?peer, "mDNS discovered a peer");
                if inputs.send(Input::Discovered { addr, peer }).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(daemon)
}
