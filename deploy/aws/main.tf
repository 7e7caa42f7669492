# A VPC with a public relay (Elastic IP, UDP 4433) and, in a private subnet, a connector with
# native XDP on its ENA interface beside a test service. Walk-through: README.md.

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:only the first zone is used, once, for both subnets
  state = "available"
}

# Debian 12 (bookworm), the release the binaries are built and tested on.
data "aws_ami" "debian" {
  most_recent = true
  owners      = ["136693071363"] # Debian
  filter {
    name   = "name"
    values = ["debian-12-amd64-*"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

locals {
  az             = data.aws_availability_zones.available.names[0]
  public_subnet  = cidrsubnet(var.vpc_cidr, 8, 0)
  private_subnet = cidrsubnet(var.vpc_cidr, 8, 1)
  # Fixed addresses, so the configs can name them before the instances exist.
  connector_ip = cidrhost(local.private_subnet, 10)
  service_ip   = cidrhost(local.private_subnet, 20)
  tags         = { Project = var.name }
}

# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = var.name })
}

# Nothing may use the default security group.
resource "aws_default_security_group" "default" {
  vpc_id = aws_vpc.main.id
  tags   = local.tags
}

resource "aws_flow_log" "main" {
  vpc_id               = aws_vpc.main.id
  traffic_type         = "REJECT"
  log_destination_type = "s3"
  log_destination      = aws_s3_bucket.flow_logs.arn
  tags                 = local.tags
}

resource "aws_s3_bucket" "flow_logs" {
  #checkov:skip=CKV_AWS_144:cross-region replication is out of scope for a walk-through VPC
  #checkov:skip=CKV_AWS_145:SSE-S3 (below) suffices for rejected-flow records
  #checkov:skip=CKV_AWS_18:this bucket is itself a log sink
  #checkov:skip=CKV2_AWS_62:no event consumer
  bucket_prefix = "${var.name}-flow-logs-"
  force_destroy = true
  tags          = local.tags
}

resource "aws_s3_bucket_versioning" "flow_logs" {
  bucket = aws_s3_bucket.flow_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "flow_logs" {
  bucket = aws_s3_bucket.flow_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "flow_logs" {
  bucket                  = aws_s3_bucket.flow_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "flow_logs" {
  bucket = aws_s3_bucket.flow_logs.id
  rule {
    id     = "expire"
    status = "Enabled"
    filter {}
    expiration {
      days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id
  tags   = local.tags
}

resource "aws_subnet" "public" {
  vpc_id                  = aws_vpc.main.id
  cidr_block              = local.public_subnet
  availability_zone       = local.az
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${var.name}-public" })
}

resource "aws_subnet" "private" {
  vpc_id            = aws_vpc.main.id
  cidr_block        = local.private_subnet
  availability_zone = local.az
  tags              = merge(local.tags, { Name = "${var.name}-private" })
}

# The private subnet reaches the relay's public address (and the Debian mirrors) through a NAT
# gateway. AWS runs it; no instance here routes for others, so every instance keeps
# source/destination checking on (see README.md).
resource "aws_eip" "nat" {
  #checkov:skip=CKV2_AWS_19:attached to the NAT gateway, not an instance
  domain = "vpc"
  tags   = local.tags
}

resource "aws_nat_gateway" "main" {
  allocation_id = aws_eip.nat.id
  subnet_id     = aws_subnet.public.id
  tags          = local.tags
  depends_on    = [aws_internet_gateway.main]
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main.id
  }
  tags = local.tags
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id
  route {
    cidr_block     = "0.0.0.0/0"
    nat_gateway_id = aws_nat_gateway.main.id
  }
  tags = local.tags
}

resource "aws_route_table_association" "public" {
  subnet_id      = aws_subnet.public.id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table_association" "private" {
  subnet_id      = aws_subnet.private.id
  route_table_id = aws_route_table.private.id
}

# ---------------------------------------------------------------------------------------------
# Security groups
# ---------------------------------------------------------------------------------------------

resource "aws_security_group" "relay" {
  name        = "${var.name}-relay"
  description = "ztna relay: QUIC from anywhere, metrics from the admin network"
  vpc_id      = aws_vpc.main.id
  tags        = local.tags

  ingress {
    description = "QUIC from agents and connectors"
    from_port   = 4433
    to_port     = 4433
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "address observation for hard-NAT detection (QUIC port + 2)"
    from_port   = 4435
    to_port     = 4435
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "metrics, healthz, readyz"
    from_port   = 9090
    to_port     = 9090
    protocol    = "tcp"
    cidr_blocks = distinct([var.vpc_cidr, var.admin_cidr])
  }
  egress {
    description = "package mirrors, the release URL, SSM: HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "package mirrors, the release URL, SSM: HTTP (Debian mirrors; packages are signed)"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "connector" {
  name        = "${var.name}-connector"
  description = "ztna connector: direct paths from agents, metrics from the admin network"
  vpc_id      = aws_vpc.main.id
  tags        = local.tags

  ingress {
    description = "direct paths (hole punching) from agents"
    from_port   = 4434
    to_port     = 4434
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  ingress {
    description = "metrics, healthz, readyz"
    from_port   = 9090
    to_port     = 9090
    protocol    = "tcp"
    cidr_blocks = distinct([var.vpc_cidr, var.admin_cidr])
  }
  egress {
    description = "the relay (UDP 4433) and direct paths to agents (any UDP port: hole punching)"
    from_port   = 0
    to_port     = 65535
    protocol    = "udp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "the private services"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = [var.vpc_cidr]
  }
  egress {
    description = "package mirrors, the release URL, SSM: HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "package mirrors, the release URL, SSM: HTTP (Debian mirrors; packages are signed)"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "service" {
  name        = "${var.name}-service"
  description = "private test service: reachable from the connector only"
  vpc_id      = aws_vpc.main.id
  tags        = local.tags

  ingress {
    description     = "everything from the connector (UDP echo 7, HTTP 80, ICMP)"
    from_port       = 0
    to_port         = 0
    protocol        = "-1"
    security_groups = [aws_security_group.connector.id]
  }
  egress {
    description = "package mirrors through the NAT gateway: HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "package mirrors through the NAT gateway: HTTP (Debian mirrors; packages are signed)"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# ---------------------------------------------------------------------------------------------
# Secrets: the private keys go to SSM Parameter Store (SecureString), never into user-data,
# which every process on the instance can read from the metadata service. Each instance may read
# only its own. (They are in the Terraform state too: keep the state encrypted and private.)
# ---------------------------------------------------------------------------------------------

resource "aws_kms_key" "ztna" {
  description             = "${var.name} private keys in SSM"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  tags                    = local.tags
}

resource "aws_kms_key_policy" "ztna" {
  key_id = aws_kms_key.ztna.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "account"
        Effect    = "Allow"
        Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
    ]
  })
}

data "aws_caller_identity" "current" {}

resource "aws_ssm_parameter" "key" {
  for_each = toset(["relay", "connector"])
  name     = "/${var.name}/${each.key}.key"
  type     = "SecureString"
  key_id   = aws_kms_key.ztna.arn
  value    = file("${var.pki_dir}/${each.key}.key")
  tags     = local.tags
}

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  for_each           = toset(["relay", "connector"])
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = local.tags
}

data "aws_iam_policy_document" "read_key" {
  for_each = toset(["relay", "connector"])
  statement {
    actions   = ["ssm:GetParameter"]
    resources = [aws_ssm_parameter.key[each.key].arn]
  }
  statement {
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.ztna.arn]
  }
}

resource "aws_iam_role_policy" "read_key" {
  for_each = toset(["relay", "connector"])
  name     = "read-own-key"
  role     = aws_iam_role.node[each.key].id
  policy   = data.aws_iam_policy_document.read_key[each.key].json
}

# Shell access through SSM Session Manager: no SSH port is open anywhere.
resource "aws_iam_role_policy_attachment" "ssm" {
  for_each   = toset(["relay", "connector"])
  role       = aws_iam_role.node[each.key].name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "node" {
  for_each = toset(["relay", "connector"])
  name     = "${var.name}-${each.key}"
  role     = aws_iam_role.node[each.key].name
}

# ---------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------

resource "aws_instance" "relay" {
  ami                    = data.aws_ami.debian.id
  instance_type          = var.relay_instance_type
  subnet_id              = aws_subnet.public.id
  vpc_security_group_ids = [aws_security_group.relay.id]
  iam_instance_profile   = aws_iam_instance_profile.node["relay"].name
  monitoring             = true
  ebs_optimized          = true
  # The relay terminates QUIC at its own address and routes nothing: keep the check on.
  source_dest_check = true
  user_data = templatefile("${path.module}/relay-user-data.yaml", {
    release_url    = var.release_url
    release_sha256 = var.release_sha256
    ca_pem         = indent(6, file("${var.pki_dir}/ca.pem"))
    cert_pem       = indent(6, file("${var.pki_dir}/relay.pem"))
    key_parameter  = aws_ssm_parameter.key["relay"].name
    region         = var.region
  })
  user_data_replace_on_change = true

  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }
  root_block_device {
    encrypted   = true
    volume_size = 8
  }
  tags = merge(local.tags, { Name = "${var.name}-relay" })
}

resource "aws_eip" "relay" {
  domain   = "vpc"
  instance = aws_instance.relay.id
  tags     = merge(local.tags, { Name = "${var.name}-relay" })
}

resource "aws_instance" "connector" {
  ami                    = data.aws_ami.debian.id
  instance_type          = var.connector_instance_type
  subnet_id              = aws_subnet.private.id
  private_ip             = local.connector_ip
  vpc_security_group_ids = [aws_security_group.connector.id]
  iam_instance_profile   = aws_iam_instance_profile.node["connector"].name
  monitoring             = true
  ebs_optimized          = true
  # The connector proxies agents' flows from its own address (it does not forward packets it
  # did not originate), so source/destination checking stays on. Turn it off only on an
  # instance that routes for others (a NAT instance, a subnet router).
  source_dest_check = true
  user_data = templatefile("${path.module}/connector-user-data.yaml", {
    release_url    = var.release_url
    release_sha256 = var.release_sha256
    ca_pem         = indent(6, file("${var.pki_dir}/ca.pem"))
    cert_pem       = indent(6, file("${var.pki_dir}/connector.pem"))
    key_parameter  = aws_ssm_parameter.key["connector"].name
    region         = var.region
    relay_addr     = "${aws_eip.relay.public_ip}:4433"
    service_ip     = local.service_ip
    xdp_mtu        = var.xdp_mtu
  })
  user_data_replace_on_change = true

  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }
  root_block_device {
    encrypted   = true
    volume_size = 8
  }
  tags = merge(local.tags, { Name = "${var.name}-connector" })
}

resource "aws_instance" "service" {
  #checkov:skip=CKV2_AWS_41:the test service needs no AWS API access
  ami                    = data.aws_ami.debian.id
  instance_type          = var.service_instance_type
  subnet_id              = aws_subnet.private.id
  private_ip             = local.service_ip
  vpc_security_group_ids = [aws_security_group.service.id]
  monitoring             = true
  ebs_optimized          = true
  source_dest_check      = true
  user_data              = file("${path.module}/service-user-data.yaml")

  metadata_options {
    http_tokens   = "required"
    http_endpoint = "enabled"
  }
  root_block_device {
    encrypted   = true
    volume_size = 8
  }
  tags = merge(local.tags, { Name = "${var.name}-service" })
}
