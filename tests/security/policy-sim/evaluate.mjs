// Evaluate IAM requests against policies with @cloud-copilot/iam-simulate (test-only).
// stdin: JSON array of {policies: {name: policy}, principal, action, resource, account, context};
// stdout: JSON array of {result, ignoredContextKeys, errors} in the same order.
import { runSimulation } from '@cloud-copilot/iam-simulate'

const input = JSON.parse(await new Promise((resolve) => {
  let data = ''
  process.stdin.on('data', (chunk) => { data += chunk })
  process.stdin.on('end', () => resolve(data))
}))

const out = []
for (const c of input) {
  const r = await runSimulation({
    request: {
      principal: c.principal,
      action: c.action,
      resource: { resource: c.resource, accountId: c.account },
      contextVariables: c.context || {},
    },
    identityPolicies: Object.entries(c.policies).map(([name, policy]) => ({ name, policy })),
    serviceControlPolicies: [],
    resourceControlPolicies: [],
  }, {})
  if (r.resultType === 'error') {
    out.push({ result: 'Error', errors: r.errors })
  } else if (r.resultType === 'single') {
    out.push({ result: r.overallResult, ignoredContextKeys: r.result.ignoredContextKeys || [] })
  } else {
    out.push({ result: r.overallResult ?? 'Wildcard', raw: r.resultType })
  }
}
process.stdout.write(JSON.stringify(out))
