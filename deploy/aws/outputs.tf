output "relay_address" {
  description = "The relay's public UDP address: the entry of `relays` in the agent's config."
  value       = "${aws_eip.relay.public_ip}:4433"
}

output "service_address" {
  description = "Private address of the test service (reached by agents as 10.100.0.1 and 10.100.0.4)."
  value       = local.service_ip
}

output "agent_config" {
  description = "An agent config for the walk-through; put the agent's own certificate and key beside ca.pem."
  value       = <<-EOT
    relays = ["${aws_eip.relay.public_ip}:4433"]
    relay_name = "relay"
    ca = "/etc/ztna/pki/ca.pem"
    cert = "/etc/ztna/pki/alice.pem"
    key = "/etc/ztna/pki/alice.key"
  EOT
}

output "connector_metrics" {
  description = "The connector's /metrics, /healthz and /readyz (from inside the VPC)."
  value       = "http://${local.connector_ip}:9090"
}
