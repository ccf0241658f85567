Feature: CLOUD nodes, polling and failover
  In the CLOUD profile orchestratord learns pools by polling every pool-managerd over HTTP and
  reaches engines only through their authenticated proxies. Each daemon runs in a network
  namespace of its own, linked by veth pairs (the e2e-cloud harness); a node goes away when
  its link is cut or its pool-managerd is killed. Node n serves pool a0, b0, ... of one slot.

  Background:
    Given a CLOUD cluster of 2 nodes in network namespaces

  Scenario: orchestratord learns the pools of every node by polling
    Then orchestratord lists pools "a0" and "b0" as ready within 40 seconds
    And orchestratord lists 2 nodes online

  Scenario: Tasks reach the engines of both nodes through the pool-managerd proxies
    Given pools "a0" and "b0" are ready
    When a client submits 4 tasks of 300 tokens
    Then the 4 tasks complete
    And pools "a0" and "b0" both ran some of them

  Scenario: A node cut off from the network is taken out, and comes back
    Given pools "a0" and "b0" are ready
    When the link to node 1 goes down
    Then pool "a0" is unavailable within 3 seconds
    And a task of 8 tokens completes on pool "b0"
    When the link to node 1 comes back up
    Then orchestratord lists pool "a0" as ready within 10 seconds

  Scenario: A node whose pool-managerd dies is taken out and the survivor takes the work
    Given pools "a0" and "b0" are ready
    When pool-managerd on node 1 is killed
    Then pool "a0" is unavailable within 3 seconds
    And a task of 8 tokens completes on pool "b0"
