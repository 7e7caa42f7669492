variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix of every resource name and of the SSM parameters (/NAME/...)."
  type        = string
  default     = "ztna"
}

variable "vpc_cidr" {
  description = "CIDR of the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "admin_cidr" {
  description = "Where the relay's and connector's metrics (TCP 9090) may be scraped from, besides the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "release_url" {
  description = "HTTPS URL of the release tarball (bin/ztna-*, share/ztna/systemd/*): see README.md, step 1."
  type        = string
}

variable "release_sha256" {
  description = "SHA-256 of the release tarball; cloud-init refuses any other file."
  type        = string
}

variable "pki_dir" {
  description = "Directory written by `ztna-relay pki` (ca.pem, relay.pem/.key, connector.pem/.key): README.md, step 2."
  type        = string
  default     = "pki"
}

variable "relay_instance_type" {
  description = "Relay instance type. One core forwards about 600-800 Mbit/s (bench/)."
  type        = string
  default     = "c6in.large"
}

variable "connector_instance_type" {
  description = "Connector instance type: an ENA instance (every current generation type is)."
  type        = string
  default     = "c6in.large"
}

variable "service_instance_type" {
  description = "Type of the private test service instance."
  type        = string
  default     = "t3.micro"
}

variable "xdp_mtu" {
  description = "MTU of the connector's ENA interface: at most 3498 for native XDP (ENA driver limit, 4 KiB pages)."
  type        = number
  default     = 3498

  validation {
    condition     = var.xdp_mtu >= 1280 && var.xdp_mtu <= 3498
    error_message = "ENA runs native XDP only with an MTU of at most 3498."
  }
}
