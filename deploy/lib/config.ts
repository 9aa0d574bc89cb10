// What can vary between deployments, read from CDK context (`-c key=value` or cdk.json),
// validated once so the stack itself never sees a malformed value.

export interface DemoConfig {
  /** Cloud Map HTTP namespace the demo servers register in and the control plane serves. */
  readonly namespace: string;
  /** Cloud Map service of the demo servers; clients dial `xds:///<serviceName>.<namespace>`. */
  readonly serviceName: string;
  /** Tag of the three images in this account's ECR repositories. */
  readonly imageTag: string;
  /**
   * Who may call /describe. Set: the NLB is internet-facing and only this CIDR gets in.
   * Unset: the NLB is internal and only the VPC gets in.
   */
  readonly allowedCidr?: string;
  /** Add an Envoy sidecar (ADS to the control plane) to every demo-client task. */
  readonly envoySidecar: boolean;
  /** Explicit AZ names; unset means the region's first three (Fn::GetAZs). */
  readonly availabilityZones?: string[];
  readonly natGateways: number;
  readonly serverCount: number;
  readonly clientCount: number;
}

export const DEFAULTS = {
  namespace: 'demo',
  serviceName: 'echo',
  imageTag: 'latest',
  natGateways: 1,
  serverCount: 6,
  clientCount: 3,
} as const;

/** Reads context through `get` (for an app: `key => app.node.tryGetContext(key)`). */
export function configFromContext(get: (key: string) => unknown): DemoConfig {
  const str = (key: string): string | undefined => {
    const value = get(key);
    if (value === undefined || value === null || value === '') return undefined;
    if (typeof value !== 'string' && typeof value !== 'number' && typeof value !== 'boolean') {
      throw new Error(`context ${key} must be a string, got ${JSON.stringify(value)}`);
    }
    return String(value);
  };
  const int = (key: string, fallback: number, min: number): number => {
    const text = str(key);
    if (text === undefined) return fallback;
    const value = Number(text);
    if (!Number.isInteger(value) || value < min) {
      throw new Error(`context ${key}=${text} must be an integer >= ${min}`);
    }
    return value;
  };

  const namespace = str('namespace') ?? DEFAULTS.namespace;
  if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/.test(namespace)) {
    throw new Error(`context namespace=${namespace} is not a valid Cloud Map namespace name (lower-case DNS labels)`);
  }

  const allowedCidr = str('allowedCidr');
  if (allowedCidr !== undefined && !isIpv4Cidr(allowedCidr)) {
    throw new Error(`context allowedCidr=${allowedCidr} is not an IPv4 CIDR such as 203.0.113.7/32`);
  }

  const sidecar = str('envoySidecar') ?? 'false';
  if (sidecar !== 'true' && sidecar !== 'false') {
    throw new Error(`context envoySidecar=${sidecar} must be true or false`);
  }

  const azValue = get('availabilityZones');
  const availabilityZones = Array.isArray(azValue)
    ? azValue.map(String)
    : str('availabilityZones')?.split(',').map(az => az.trim()).filter(az => az !== '');
  if (availabilityZones !== undefined && (availabilityZones.length < 2 || availabilityZones.length > 3)) {
    throw new Error(`context availabilityZones must name 2 or 3 zones, got ${availabilityZones.join(',')}`);
  }

  return {
    namespace,
    serviceName: DEFAULTS.serviceName,
    imageTag: str('imageTag') ?? DEFAULTS.imageTag,
    allowedCidr,
    envoySidecar: sidecar === 'true',
    availabilityZones,
    natGateways: int('natGateways', DEFAULTS.natGateways, 1),
    serverCount: int('serverCount', DEFAULTS.serverCount, 1),
    clientCount: int('clientCount', DEFAULTS.clientCount, 1),
  };
}

function isIpv4Cidr(text: string): boolean {
  const match = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(text);
  if (!match) return false;
  const octets = match.slice(1, 5).map(Number);
  return octets.every(o => o <= 255) && Number(match[5]) <= 32;
}
