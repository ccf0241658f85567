Feature: CLOUD nodes, polling and failover
  In the CLOUD profile orchestratord learns pools by polling every pool-managerd over HTTP (here
  every second) and reaches engines only through their authenticated proxies. Each daemon runs
  in a network namespace of its own, linked by veth pairs (the e2e-cloud harness), so an engine
  bound to its node's loopback is out of orchestratord's reach but for the proxy. A node goes
  away when its link is cut or its pool-managerd is killed. Node 1 serves pool a0, node 2 pool
  b0, one slot each.

  Background:
    Given a CLOUD cluster of 2 nodes in network namespaces

  @CLOUD-4112
  Scenario: orchestratord learns every node's pools by polling and reaches them through the proxies
    Then orchestratord lists pools "a0" and "b0" as ready within 40 seconds
    And orchestratord lists 2 nodes online
    When a client submits 4 tasks of 300 tokens
    Then the 4 tasks complete
    And pools "a0" and "b0" both ran some of them

  @CLOUD-4103
  Scenario: A node cut off from the network is taken out, and comes back
    Given pools "a0" and "b0" are ready
    When the link to node 1 goes down
    Then pool "a0" is unavailable within 2500 ms
    And a task of 8 tokens completes on pool "b0"
    When the link to node 1 comes back up
    Then orchestratord lists pool "a0" as ready within 10 seconds

  @CLOUD-4103
  Scenario: A node whose pool-managerd dies is taken out and the survivor takes the work
    Given pools "a0" and "b0" are ready
    When pool-managerd on node 1 is killed
    Then pool "a0" is unavailable within 2500 ms
    And a task of 8 tokens completes on pool "b0"
